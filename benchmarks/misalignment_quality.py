"""Misalignment detection quality on SmolLM2: AUROC of the tag-group score, held out.

The bundled labelled responses (featurewatch/data/labelled) are split by a hash of the
prompt id into a discovery split (70%) and a held-out split (30%) that discovery and the
probe never see. On the discovery split, features are ranked by AUROC (max-pooled over
response tokens, misaligned against aligned), the best --group-size form the group, and
the logistic probe is fitted on them. On the held-out split the script prints the AUROC
of the group score for probe, max and mean pooling, overall and per domain.
Target: probe AUROC >= 0.9.

With --register the group is tagged `misalignment` in the catalog and the probe stored
with the SAE version, so `featurewatch score --tag misalignment FILE` works at once.

    .venv/bin/python benchmarks/misalignment_quality.py [--sae-version V] [--register]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from featurewatch.analysis.discover import encode_transcripts, rank_contrast
from featurewatch.analysis.scoring import fit_probe, group_scores
from featurewatch.analysis.transcripts import bundled
from featurewatch.config import load_config
from featurewatch.sae import load
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.registry import FeatureRegistry
from featurewatch.storage.sae_store import registered_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="featurewatch YAML config")
    parser.add_argument("--sae-version", default=None, help="default: the newest registered")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--register", action="store_true", help="tag the group, store the probe")
    args = parser.parse_args()
    cfg = load_config(args.config)
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_dir) as catalog:
        choice = registered_sae(cfg, catalog, args.sae_version)
    sae = load(choice.path)
    split = {s: bundled(f"aligned:{s}") + bundled(f"misaligned:{s}") for s in ("train", "heldout")}
    started = time.perf_counter()
    pooled = {s: encode_transcripts(cfg, choice, sae, ts, progress=True) for s, ts in split.items()}
    seconds = time.perf_counter() - started
    labels = {s: np.array([t.label for t in ts]) for s, ts in split.items()}

    train_max = pooled["train"].max.numpy()
    y = labels["train"]
    ranked = rank_contrast(train_max[y == 1], train_max[y == 0], top=args.group_size, bootstrap=0)
    group = [r["feature_id"] for r in ranked]
    probe = fit_probe(
        pooled["train"], y.tolist(), group, tag="misalignment", sae_version=choice.version
    )
    held_y = labels["heldout"]
    domains = np.array([t.extra["domain"] for t in split["heldout"]])
    result = {
        "sae_version": choice.version,
        "train": len(y),
        "heldout": len(held_y),
        "encode_seconds": round(seconds, 1),
        "group": group,
        "group_train_auroc": [round(r["auroc"], 3) for r in ranked],
        "probe_cv_auroc_train": round(probe.fitted_on["cv_auroc"], 3),
    }
    for pooling in ("probe", "max", "mean"):
        scores, _ = group_scores(pooled["heldout"], group, pooling, probe)
        result[f"heldout_auroc_{pooling}"] = round(float(roc_auc_score(held_y, scores)), 3)
    scores, _ = group_scores(pooled["heldout"], group, "probe", probe)
    result["heldout_auroc_probe_by_domain"] = {
        d: round(float(roc_auc_score(held_y[domains == d], scores[domains == d])), 3)
        for d in sorted(set(domains))
    }
    print(json.dumps(result, indent=2))
    if args.register:
        with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
            registry = FeatureRegistry(catalog)
            for old in registry.ids_with_tag(choice.version, "misalignment"):
                registry.tag(choice.version, [old], ["misalignment"], actor="bench", remove=True)
            registry.tag(choice.version, group, ["misalignment"], actor="misalignment_quality")
        print(f"tagged {len(group)} features; probe stored at {probe.save(choice.path)}")


if __name__ == "__main__":
    main()
