"""The `refresh_sae` action on a real local Ray cluster: traffic drifts away from what the
SAE was trained on, the job trains a child from it on the recent window, and the running
pipeline takes the child over (with the parent's tags) and reconstructs better."""

import json
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

from featurewatch.actors.pipeline import encode_segments, follow_segments, segments_dataset
from featurewatch.config import build_config
from featurewatch.platform.cli import app
from featurewatch.platform.control.actions import refresh_sae_handler
from featurewatch.platform.jobs.train_sae import train_sae
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.inbox import pending
from featurewatch.storage.registry import FeatureRegistry
from tests.integration.test_ray_pipeline import WIDTH, fill_spool

# The median: a token whose code is all zeros is a zero vector, with a relative error
# of anything over nothing.
MEDIAN_RECON_ERROR = """
SELECT median(recon_error) AS err FROM tokens
WHERE sae_version = ? AND request_id IN (SELECT unnest(?::VARCHAR[]))
"""


@pytest.fixture
def drifted(ray_cluster, tmp_path):
    """A parent SAE trained on traffic A, in use by the pipeline, then traffic B."""
    cfg = build_config(
        {
            "home": str(tmp_path / "home"),
            "capture": {"layers": [1]},
            # Every matched pair holds here; the gate's own test raises the bar.
            "sae": {
                "d_sae": 48,
                "k": 4,
                "epochs": 20,
                "batch_size": 64,
                "lr": 3e-3,
                "inherit_min_cosine": -1.0,
                "inherit_min_correlation": -1.0,
            },
        }
    )
    old = fill_spool(cfg.spool_dir, segments=2, seed=0)
    parent = train_sae(cfg, segments_dataset(old), WIDTH, version="parent")
    # A new basis: the drifted traffic the parent has never seen (seq 100.. keeps keys new).
    fill_spool(cfg.spool_dir, segments=7, seed=5, first_seq=100)
    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        catalog.register_sae(
            "parent", parent.path, architecture="topk", model=cfg.model.name, layer=1,
            site="resid_post", d_in=WIDTH, d_sae=48, k=4, metrics=parent.metrics,
        )  # fmt: skip
        FeatureRegistry(catalog).tag("parent", [3, 5], ["misalignment"], actor="ana")
        encode_segments(cfg, parent.sae, "parent", catalog)
    return cfg, parent


def test_a_stale_sae_is_refreshed_and_swapped_into_the_running_pipeline(drifted):
    cfg, parent = drifted
    # Under a lenient threshold the parent counts as fresh: nothing is trained.
    config = cfg.home / "fw.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ran = CliRunner().invoke(
        app, ["sae", "refresh", "--window", "1h", "--fvu-threshold", "9", "-c", str(config)]
    )
    assert ran.exit_code == 0, ran.output
    fresh = json.loads(ran.stdout)
    assert not fresh["refreshed"] and "the dictionary is fresh" in ran.stderr
    assert fresh["parent"] == "parent"  # the newest registered version by default
    assert fresh["parent_fvu"] > 0.3  # it reconstructs the new traffic badly
    assert (fresh["train_segments"], fresh["held_out_segments"]) == (8, 1)
    assert not pending(cfg.inbox_dir)

    # The gate: at a bar no retrained latent reaches, the tagged features 3 and 5 have no
    # pair that holds (and no group probe stands in): the child is discarded.
    action = {"type": "refresh_sae", "fvu_threshold": 0.3, "data_window": "PT1H", "epochs": 10}
    strict = cfg.model_copy(update={"sae": cfg.sae.model_copy(update={"inherit_min_cosine": 1.0})})
    with pytest.raises(RuntimeError) as refused:  # the action fails, naming why
        refresh_sae_handler(strict)(action, {"numbers": {"sae_version": "parent"}})
    detail = str(refused.value)
    assert "tagged features 0 of 2 matched (unmatched: [3, 5])" in detail, detail
    assert "its tagged features moved: discarded, the parent stays" in detail
    assert not pending(cfg.inbox_dir)

    # The controller's action, as a fired policy hands it over.
    detail = refresh_sae_handler(cfg)(action, {"numbers": {"sae_version": "parent"}})
    assert "kept: registration requested" in detail, detail
    (request,) = pending(cfg.inbox_dir)
    child = request.name.split("-sae-", 1)[1].removesuffix(".json")
    assert child.startswith("parent-r")

    # The running pipeline applies the request between rounds and encodes with the child.
    switched, reports, stop = [], [], threading.Event()
    with Catalog(cfg.catalog_path, cfg.lake_dir) as writer:
        service = threading.Thread(
            target=follow_segments,
            args=(cfg, parent.sae, "parent", writer),
            kwargs={
                "every_s": 0.2, "stop": stop, "on_switch": switched.append,
                "on_report": reports.append,
            },
        )  # fmt: skip
        service.start()
        deadline = time.monotonic() + 120
        # (the writer's connection is the service's: the test only listens to reports)
        while sum(r.segments_committed for r in reports) < 9 and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        service.join()
    assert switched == [child]
    assert pending(cfg.inbox_dir) == []
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_dir) as reader:
        assert len(reader.committed_segments(child)) == 9
        row = reader.query(
            "SELECT parent_version, metrics->>'fvu_fresh' AS fvu FROM sae_versions "
            "WHERE sae_version = ?",
            [child],
        ).to_pylist()[0]
        assert row["parent_version"] == "parent" and float(row["fvu"]) < fresh["parent_fvu"]
        # The tags went along the matching: to the child latents matched to 3 and 5.
        heirs = (
            reader.query(
                "SELECT child_id FROM sae_matches WHERE child_version = ? AND parent_id IN (3, 5)",
                [child],
            )
            .column(0)
            .to_pylist()
        )
        assert FeatureRegistry(reader).ids_with_tag(child, "misalignment") == sorted(heirs)
        # Its latents matched one to one to the parent's, joinable in SQL.
        matched = reader.query(
            "SELECT count(DISTINCT child_id) AS n, min(cosine) AS low, max(cosine) AS high, "
            "count(correlation) AS correlated FROM sae_matches m JOIN sae_versions v "
            "ON v.sae_version = m.child_version WHERE m.parent_version = 'parent' "
            "AND v.sae_version = ?",
            [child],
        ).to_pylist()[0]
        assert matched["n"] == 48 and matched["correlated"] == 48
        assert -1.0 <= matched["low"] <= matched["high"] <= 1.0 + 1e-6
        # In the lake: the drifted traffic is reconstructed better by the child.
        drifted_requests = [f"req-{seq}" for seq in range(101, 129)]
        errors = {
            version: reader.query(MEDIAN_RECON_ERROR, [version, drifted_requests]).to_pylist()[0]
            for version in ("parent", child)
        }
    assert errors[child]["err"] < 0.7 * errors["parent"]["err"], errors
