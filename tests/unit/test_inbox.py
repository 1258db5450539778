"""Registration requests: handed to the catalog's writer as files, applied between its
rounds; a bad request is rejected with its reason and never stops the others."""

import os
import time

import pytest
import torch

from featurewatch.errors import ConfigError
from featurewatch.platform.jobs.refresh_sae import decoder_cosine, judge, split_held_out
from featurewatch.sae.model import TopKSAE
from featurewatch.sae.train import evaluate
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.inbox import (
    ModelVersionRegistration,
    SAERegistration,
    apply_registrations,
    pending,
    submit,
)
from featurewatch.storage.registry import FeatureRegistry


def sae_folder(path, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(8, 32, 4)
    torch.nn.init.normal_(sae.W_enc)
    torch.nn.init.normal_(sae.W_dec)
    sae.save(path)
    return sae


def child_request(tmp_path, **overrides):
    fields = dict(
        sae_version="sae1-r1", path=str(tmp_path / "child"), architecture="topk", model="m",
        layer=3, d_in=8, d_sae=32, k=4, metrics={"fvu": 0.1}, parent_version="sae1",
        inherit_registry=True,
    )  # fmt: skip
    return SAERegistration(**{**fields, **overrides})


@pytest.fixture
def catalog(tmp_path):
    sae_folder(tmp_path / "parent")
    sae_folder(tmp_path / "child", seed=1)
    with Catalog(tmp_path / "c.duckdb", tmp_path / "lake") as cat:
        cat.register_sae(
            "sae1", tmp_path / "parent", architecture="topk", model="m", layer=3, d_in=8,
            d_sae=32, k=4, metrics={},
        )  # fmt: skip
        registry = FeatureRegistry(cat)
        registry.label("sae1", 7, actor="ana", label="toxic persona")
        registry.tag("sae1", [7, 9], ["misalignment"], actor="ana")
        yield cat


def test_a_child_sae_is_registered_with_its_parents_labels_and_tags(catalog, tmp_path):
    home = tmp_path / "home"
    submit(home, child_request(tmp_path, matches=[(7, 3, 0.95, 0.8), (9, 9, 0.5, None)]))
    submit(home, ModelVersionRegistration(model="m", model_version="v2", path=str(tmp_path)))
    assert len(pending(home)) == 2
    applied = apply_registrations(catalog, home)
    assert [r.kind for r in applied] == ["sae", "model_version"]
    assert pending(home) == [] and len(list((home / "applied").iterdir())) == 2
    row = catalog.query(
        "SELECT parent_version, metrics->>'fvu' AS fvu FROM sae_versions "
        "WHERE sae_version = 'sae1-r1'"
    ).to_pylist()
    assert row == [{"parent_version": "sae1", "fvu": "0.1"}]
    assert catalog.query(
        "SELECT parent_id, child_id, cosine, correlation FROM sae_matches "
        "WHERE parent_version = 'sae1' AND child_version = 'sae1-r1' ORDER BY parent_id"
    ).to_pylist() == [
        {"parent_id": 7, "child_id": 3, "cosine": 0.95, "correlation": 0.8},
        {"parent_id": 9, "child_id": 9, "cosine": 0.5, "correlation": None},
    ]
    registry = FeatureRegistry(catalog)
    assert registry.ids_with_tag("sae1-r1", "misalignment") == [7, 9]
    entry = registry.show("sae1-r1", 7)
    assert entry["label"] == "toxic persona"
    assert [(h["actor"], h["field"], h["new_value"]) for h in entry["history"]] == [
        ("refresh_sae", "inherited", "sae1")
    ]
    assert catalog.query("SELECT model_version FROM model_versions").to_pylist() == [
        {"model_version": "v2"}
    ]
    # The published copy readers open already shows the new version.
    with Catalog.for_analyst(catalog.path, catalog.lake) as reader:
        assert reader.query(
            "SELECT count(*) AS n FROM sae_versions WHERE sae_version = 'sae1-r1'"
        ).to_pylist() == [{"n": 1}]


def test_a_child_inherits_only_along_the_pairs_that_hold(catalog, tmp_path):
    """Feature 7 is the child's 3 (a pair that holds): its label and tag go to 3. Feature
    9 moved away (its pair is not among those that hold): its tag is not inherited."""
    home = tmp_path / "home"
    matches = [(7, 3, 0.95, 0.8), (9, 9, 0.3, 0.1)]
    submit(home, child_request(tmp_path, matches=matches, inherit_pairs=matches[:1]))
    apply_registrations(catalog, home)
    registry = FeatureRegistry(catalog)
    assert registry.ids_with_tag("sae1-r1", "misalignment") == [3]
    entry = registry.show("sae1-r1", 3)
    assert entry["label"] == "toxic persona"
    assert [(h["field"], h["new_value"]) for h in entry["history"]] == [
        ("inherited", "sae1#7 (cosine 0.950, correlation 0.800)")
    ]
    assert registry.show("sae1-r1", 9)["tags"] == []
    assert registry.show("sae1-r1", 7)["label"] is None


def test_bad_requests_are_rejected_with_the_reason_and_the_rest_applied(catalog, tmp_path):
    home = tmp_path / "home"
    submit(home, child_request(tmp_path, sae_version="orphan", parent_version="nope"))
    submit(home, child_request(tmp_path, sae_version="nowhere", path=str(tmp_path / "missing")))
    submit(home, ModelVersionRegistration(model="m", model_version="v3", path="/no/such/dir"))
    (home / f"{time.time_ns():020d}-garbage.json").write_text("{not json")
    (home / f"{time.time_ns():020d}-extra.json").write_text(
        '{"kind": "model_version", "model": "m", "model_version": "v4", "path": "/", "x": 1}'
    )
    submit(home, child_request(tmp_path))
    applied = apply_registrations(catalog, home)
    assert [r.sae_version for r in applied] == ["sae1-r1"]
    reasons = sorted(p.read_text() for p in (home / "rejected").glob("*.reason"))
    assert len(reasons) == 5
    text = " | ".join(reasons)
    assert "parent SAE version 'nope' is not in the catalog" in text
    assert "is not an SAE folder (no cfg.json)" in text
    assert "model folder /no/such/dir does not exist" in text
    assert "not a registration request" in text and "extra" in text.lower()
    # Nothing of a rejected request reached the catalog.
    names = catalog.query("SELECT sae_version FROM sae_versions ORDER BY 1").to_pylist()
    assert [r["sae_version"] for r in names] == ["sae1", "sae1-r1"]
    assert catalog.query("SELECT * FROM model_versions").num_rows == 0


def test_a_request_is_seen_whole_or_not_at_all(tmp_path):
    home = tmp_path / "home"
    home.mkdir(parents=True)
    (home / ".half-written.json.tmp").write_text('{"kind": "sa')
    assert pending(home) == []
    path = submit(home, ModelVersionRegistration(model="m", model_version="v2", path="/"))
    assert pending(home) == [path] and not list(home.glob(".*.tmp"))[1:]


def test_the_newest_segments_are_held_out(tmp_path):
    paths = [tmp_path / f"s{i}" for i in range(25)]
    train, held = split_held_out(paths)
    assert held == paths[-3:] and train == paths[:-3]
    assert split_held_out(paths[:2]) == (paths[:1], paths[1:2])
    with pytest.raises(ConfigError, match="at least 2 sealed segments in the window, found 1"):
        split_held_out(paths[:1])


def test_a_child_worse_than_its_parent_is_not_kept(tmp_path):
    torch.manual_seed(0)
    basis = torch.randn(6, 8)
    codes = torch.relu(torch.randn(4096, 6)) * (torch.rand(4096, 6) < 0.3)
    x = codes @ basis
    parent = TopKSAE(8, 32, 4)
    with torch.no_grad():  # a parent that knows the basis reconstructs x well
        parent.W_dec.normal_()  # latents 6.. never fire: their encoder columns are 0
        parent.W_dec[:6] = basis
        parent.W_enc.zero_()
        parent.W_enc[:, :6] = torch.linalg.pinv(basis)
    random_child = sae_folder(tmp_path / "random", seed=3)
    parent_fvu = evaluate(parent, x)["fvu"]
    assert parent_fvu < 0.05
    child_fvu, keep = judge(parent_fvu, random_child, x)
    assert child_fvu > parent_fvu and not keep
    same_fvu, keep_same = judge(parent_fvu, parent, x)
    assert same_fvu == pytest.approx(parent_fvu) and keep_same  # not worse: kept
    assert decoder_cosine(parent, parent) == pytest.approx(1.0)
    assert decoder_cosine(parent, random_child) < 0.5


def test_old_segments_are_outside_the_refresh_window(tmp_path):
    from datetime import timedelta

    from featurewatch.config import build_config
    from featurewatch.platform.jobs.refresh_sae import recent_segments
    from featurewatch.storage.spool import Spool

    cfg = build_config({"home": str(tmp_path / "home")})
    spool = Spool(cfg.spool_dir)
    for _ in range(3):
        spool.append(b"x")
        spool.seal()
    spool.close()
    segments = recent_segments(cfg, timedelta(hours=1))
    assert len(segments) == 3
    day_old = time.time() - 86_400
    os.utime(segments[0], (day_old, day_old))
    assert recent_segments(cfg, timedelta(hours=1)) == segments[1:]


def test_sae_refresh_refuses_bad_arguments(tmp_path):
    from typer.testing import CliRunner

    from featurewatch.platform.cli import app

    home = ["--home", str(tmp_path / "home")]
    runner = CliRunner()
    window = runner.invoke(app, ["sae", "refresh", "--window", "soon", *home])
    assert window.exit_code == 2 and "--window must be a positive duration" in window.output
    version = runner.invoke(app, ["sae", "refresh", "--version", "../x", *home])
    assert version.exit_code == 2 and "--version '../x' may hold only" in version.output
    threshold = runner.invoke(app, ["sae", "refresh", "--fvu-threshold", "-1", *home])
    assert threshold.exit_code == 2
    nothing = runner.invoke(app, ["sae", "refresh", *home])
    assert nothing.exit_code == 1 and "no catalog at" in nothing.output
