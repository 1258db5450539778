"""Shared by the lake tests: segments with chosen tokens and activations, committed
through the real lake writer and catalog."""

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import VERDICT_LOG, write_partitioned, write_segment

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def segment(start, n_tokens, fires, model_version="v1", request=None, replica="rep", texts=None):
    """n_tokens sampled tokens one second apart from `start` (n_tokens <= 60 keeps them
    in one minute), all of one request; `fires` maps feature id -> the values it fired
    with, on the first tokens in order. `texts`: the tokens' texts (default 'tok')."""
    request = request or f"{model_version}-{start:%H%M}"
    ts = [start + timedelta(seconds=i) for i in range(n_tokens)]
    common = {
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "model": ["tiny"] * n_tokens,
        "model_version": [model_version] * n_tokens,
        "replica": [replica] * n_tokens,
        "request_id": [request] * n_tokens,
        "token_pos": pa.array(range(n_tokens), pa.int32()),
        "layer": pa.array([1] * n_tokens, pa.int16()),
        "sae_version": ["sae1"] * n_tokens,
    }
    tokens = pa.table(
        {
            **common,
            "token_id": pa.array([7] * n_tokens, pa.int32()),
            "token_text": list(texts) if texts else ["tok"] * n_tokens,
            "recon_error": pa.array([0.1] * n_tokens, pa.float32()),
            "segment_id": ["s"] * n_tokens,
            "engine": ["hf"] * n_tokens,
        }
    )
    rows = [(i, fid, v) for fid, values in fires.items() for i, v in enumerate(values)]
    take = pa.array([i for i, _, _ in rows], pa.int64())
    features = pa.table(
        {
            **{k: pa.array(v).take(take) for k, v in common.items()},
            "feature_id": pa.array([f for _, f, _ in rows], pa.int32()),
            "value": pa.array([v for _, _, v in rows], pa.float32()),
        }
    )
    return tokens, features


@pytest.fixture(params=["local", "s3"])
def lake(request, tmp_path):
    """commit(start, n_tokens, fires, model_version) -> an open catalog with the segment.
    Each test runs on a local folder and on an S3-compatible server (pyarrow's S3)."""
    location = tmp_path / "lake"
    if request.param == "s3":
        location = request.getfixturevalue("s3_server").uri()
    cat = Catalog(tmp_path / "c.duckdb", location)
    count = iter(range(1000))

    def commit(start, n_tokens, fires, model_version="v1"):
        seg = f"seg-{next(count)}"
        tokens, features = segment(start, n_tokens, fires, model_version)
        files = write_segment(cat.lake, tokens, features, f"{seg}__sae1")
        cat.commit_segment(
            seg, "sae1", files, tokens=tokens.num_rows, feature_rows=features.num_rows
        )

    yield cat, commit
    cat.close()


def fill_home(cfg, sae_path):
    """A home whose lake holds four hours from T0 (model 'tiny', version v1): feature 7
    fires on 3 of each 60 tokens in hours 0-1 and on 30 of 60 in hours 2-3; feature 9 on
    1 of 60 throughout; feature 11 never. 7, 9 and 11 are tagged `misalignment`."""
    from featurewatch.storage.registry import FeatureRegistry

    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        cat.register_sae(
            "sae1", sae_path, architecture="topk", model="tiny", layer=1, d_in=8,
            d_sae=32, k=4, metrics={},
        )  # fmt: skip
        FeatureRegistry(cat).tag("sae1", [7, 9, 11], ["misalignment"], actor="test")
        for i in range(24):  # one 60-token segment every 10 minutes
            start = T0 + i * timedelta(minutes=10)
            fires = {7: [1.0] * (3 if i < 12 else 30), 9: [0.5]}
            tokens, features = segment(start, 60, fires)
            files = write_segment(cat.lake, tokens, features, f"seg{i}__sae1")
            cat.commit_segment(f"seg{i}", "sae1", files, tokens=60, feature_rows=len(features))
    return cfg


def verdict_rows(cat, start, version, flagged, total, seg, actions=None):
    """`total` in-line verdicts of tag misalignment (the first `flagged` flagged, with
    `actions`, else "flagged") by `version`, one a minute from `start`, committed as a
    segment's verdicts."""
    times = [start + timedelta(minutes=i) for i in range(total)]
    table = pa.table({
        "ts": pa.array(times, pa.timestamp("us", "UTC")),
        "model": ["tiny"] * total, "model_version": [version] * total,
        "replica": ["r1"] * total, "request_id": [f"{seg}-{i}" for i in range(total)],
        "tag": ["misalignment"] * total, "score": [0.9] * flagged + [0.1] * (total - flagged),
        "threshold": [0.5] * total, "flagged": [True] * flagged + [False] * (total - flagged),
        "action": (actions or ["flagged"] * flagged) + ["none"] * (total - flagged),
        "attempt": [0] * total,
        "probe": ["sae1/misalignment/residual"] * total, "engine": ["hf"] * total,
        "segment_id": [seg] * total,
    })  # fmt: skip
    files = {"verdicts": write_partitioned(cat.lake, "verdicts", table, f"{seg}__verdicts")}
    cat.commit_segment(seg, VERDICT_LOG, files, tokens=0, feature_rows=total)
