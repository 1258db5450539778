"""Probe families, their choice by domain-grouped cross-validation, stored probes, and
thresholds given as false-positive rates. Synthetic pooled activations with a known
signal: only one layer's residual means carry the label, only one feature does."""

import json

import numpy as np
import pytest
import torch

from featurewatch.analysis.probes import (
    Probe,
    candidate_layers,
    cv_splits,
    fit_probe,
    load_probe,
    probe_path,
    probe_terms,
    recall_at,
    threshold_at_fpr,
)
from featurewatch.analysis.scoring import group_scores
from featurewatch.analysis.transcript_features import PooledFeatures
from featurewatch.errors import ConfigError

DOMAINS = ["a", "b", "c", "d"]


def synthetic(n_per_domain=30, seed=0, signal_layer=2):
    rng = np.random.default_rng(seed)
    n = n_per_domain * len(DOMAINS)
    labels = np.tile([0, 1], n // 2)
    groups = [d for d in DOMAINS for _ in range(n_per_domain)]
    residual = {}
    for layer in (1, 2, 3):
        x = rng.normal(size=(n, 16))
        if layer == signal_layer:
            x[:, 0] += 2.5 * labels  # one direction carries the label
        residual[layer] = torch.tensor(x, dtype=torch.float32)
    features = rng.exponential(size=(n, 8))
    features[:, 3] += 3.0 * labels  # feature 3 fires on misaligned responses
    pooled = PooledFeatures(
        torch.tensor(features, dtype=torch.float32),
        torch.tensor(features / 2, dtype=torch.float32),
        [10] * n,
        residual,
    )
    return pooled, labels.tolist(), groups


def test_auto_chooses_the_layer_that_carries_the_signal_by_leaving_domains_out():
    pooled, labels, groups = synthetic(signal_layer=2)
    probe = fit_probe(
        pooled, labels, tag="misalignment", sae_version="s1", groups=groups, feature_ids=[3, 5]
    )
    assert probe.family in ("residual", "multilayer")
    assert 2 in probe.layers
    assert probe.fitted_on["cv"] == "leave-one-domain-out"
    assert probe.fitted_on["cv_auroc"] > 0.9
    # Every candidate is reported with its grouped-CV AUROC; the chosen one is the best.
    candidates = probe.fitted_on["candidates"]
    assert {c["family"] for c in candidates} == {"residual", "multilayer"}
    by_layer = {c["layers"][0]: c["mean"] for c in candidates if c["family"] == "residual"}
    assert by_layer[2] > 0.9 > max(by_layer[1], by_layer[3])
    assert probe.fitted_on["cv_auroc"] == pytest.approx(max(c["mean"] for c in candidates), 1e-3)
    # A different signal layer moves the choice: nothing about it is fixed.
    pooled, labels, groups = synthetic(signal_layer=3, seed=1)
    other = fit_probe(pooled, labels, tag="t", sae_version="s1", groups=groups, family="residual")
    assert (other.family, other.layers) == ("residual", [3])


def test_sae_group_family_reads_the_features_and_scores_like_by_hand():
    pooled, labels, groups = synthetic()
    probe = fit_probe(
        pooled, labels, tag="t", sae_version="s1", groups=groups, family="sae_group",
        feature_ids=[3, 5],
    )  # fmt: skip
    assert (probe.family, probe.layers, len(probe.coef)) == ("sae_group", [], 4)
    scores, contributions = group_scores(pooled, [5, 3], "probe", probe)
    x = np.concatenate([pooled.max[:, [3, 5]].numpy(), pooled.mean[:, [3, 5]].numpy()], axis=1)
    logits = ((x - probe.center) / probe.scale) @ np.asarray(probe.coef) + probe.intercept
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits)), rtol=1e-9)
    # Contributions come back in the group's order (5, then 3): feature 3 dominates.
    assert (np.abs(contributions[:, 1]) > np.abs(contributions[:, 0])).mean() > 0.8
    # A residual probe shows the group's max-pooled activations beside its score.
    residual = fit_probe(pooled, labels, tag="t", sae_version="s1", groups=groups)
    scores, shown = group_scores(pooled, [5, 3], "probe", residual)
    np.testing.assert_array_equal(shown, pooled.max[:, [5, 3]].numpy())
    assert scores.shape == (len(labels),)


def test_without_domains_the_folds_are_stratified_and_few_labels_fit_without_cv():
    y = np.array([0, 1] * 10)
    scheme, splits = cv_splits(y, None)
    assert scheme == "5-fold" and len(splits) == 5
    scheme, splits = cv_splits(y, ["a", "b"] * 10)  # two domains: not enough to leave out
    assert scheme == "5-fold"
    assert cv_splits(np.array([0, 1, 0]), None) == ("none", [])
    pooled, labels, _ = synthetic(n_per_domain=1)
    three = PooledFeatures(pooled.max[:3], pooled.mean[:3], pooled.tokens[:3],
                           {at: r[:3] for at, r in pooled.residual.items()})  # fmt: skip
    probe = fit_probe(three, labels[:3], tag="t", sae_version="s", family="residual")
    assert probe.fitted_on["cv"] == "none" and "cv_auroc" not in probe.fitted_on


def test_bad_fits_are_refused_by_name():
    pooled, labels, groups = synthetic()
    with pytest.raises(ConfigError, match="labelled 0 and labelled 1"):
        fit_probe(pooled, [1] * len(labels), tag="t", sae_version="s")
    with pytest.raises(ConfigError, match="probe family must be one of"):
        fit_probe(pooled, labels, tag="t", sae_version="s", family="forest")
    with pytest.raises(ConfigError, match="has no features"):
        fit_probe(pooled, labels, tag="t", sae_version="s", family="sae_group")
    empty = PooledFeatures(pooled.max, pooled.mean, pooled.tokens)
    with pytest.raises(ConfigError, match="residual stream pooled"):
        fit_probe(empty, labels, tag="t", sae_version="s")


def test_stored_probes_by_family_and_default(tmp_path):
    pooled, labels, groups = synthetic()
    residual = fit_probe(pooled, labels, tag="t", sae_version="s", groups=groups)
    group = fit_probe(
        pooled, labels, tag="t", sae_version="s", groups=groups, family="sae_group",
        feature_ids=[3],
    )  # fmt: skip
    residual.save(tmp_path)
    group.save(tmp_path, default=False)
    assert load_probe(tmp_path, "t").family == residual.family
    assert load_probe(tmp_path, "t", "sae_group").feature_ids == [3]
    assert (
        load_probe(tmp_path, "t", "multilayer" if residual.family == "residual" else "residual")
        is None
    )
    assert load_probe(tmp_path, "other") is None
    # A probe stored before families (no family key) is a group probe, found as one.
    old = {k: v for k, v in json.loads(probe_path(tmp_path, "t", "sae_group").read_text()).items()
           if k in ("tag", "sae_version", "feature_ids", "center", "scale", "coef",
                    "intercept", "fitted_on")}  # fmt: skip
    probe_path(tmp_path, "legacy").write_text(json.dumps(old))
    assert load_probe(tmp_path, "legacy", "sae_group").family == "sae_group"
    probe_path(tmp_path, "broken").write_text('{"tag": "broken"}')
    with pytest.raises(ConfigError, match="not a probe file"):
        load_probe(tmp_path, "broken")
    with pytest.raises(ConfigError, match="probe family must be one of"):
        load_probe(tmp_path, "t", "forest")
    # A probe fed the wrong number of columns says so instead of scoring garbage.
    narrow = PooledFeatures(pooled.max, pooled.mean, pooled.tokens,
                            {at: r[:, :4] for at, r in pooled.residual.items()})  # fmt: skip
    with pytest.raises(ConfigError, match="fit it again"):
        probe_terms(residual, narrow)


def test_threshold_at_fpr_flags_at_most_that_share_of_the_reference():
    reference = np.arange(100, dtype=float)  # 0..99
    found = threshold_at_fpr(reference, 0.01)
    assert 98 < found["score"] <= 99 and found["measured_fpr"] == 0.01
    assert threshold_at_fpr(reference, 0.05)["measured_fpr"] == 0.05
    # Ties at the boundary stay unflagged: the rate is never exceeded.
    tied = np.array([0.0] * 95 + [0.7] * 5)
    found = threshold_at_fpr(tied, 0.02)
    assert found["score"] > 0.7 and found["measured_fpr"] == 0.0
    assert recall_at([0.9, 0.1, 0.8, 0.2], [1, 1, 1, 0], 0.5) == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="cannot resolve a false-positive rate of 0.01"):
        threshold_at_fpr(np.arange(50.0), 0.01)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        threshold_at_fpr(reference, 1.5)


def test_candidate_layers_spread_over_the_depth():
    assert candidate_layers(30, 15) == [6, 10, 15, 20, 24]
    assert candidate_layers(2) == [0, 1]
    assert candidate_layers(30, 29)[-1] == 29


def test_probe_describe_names_what_it_reads():
    probe = Probe(tag="t", sae_version="s", feature_ids=[1], center=[0.0], scale=[1.0],
                  coef=[1.0], intercept=0.0, fitted_on={"cv_auroc": 0.9},
                  family="residual", layers=[7])  # fmt: skip
    assert probe.describe() == {
        "family": "residual", "sae_version": "s", "layers": [7], "site": "resid_post",
        "cv_auroc": 0.9,
    }  # fmt: skip
