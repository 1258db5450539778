"""The shared SAE store on an S3-compatible server (a local moto server): publish on one
"node", fetch on another, whole or not at all."""

import shutil

import pytest
import torch

from featurewatch.config import build_config
from featurewatch.errors import SAEFormatError
from featurewatch.sae import build, load
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.sae_store import SAEStore, registered_sae


def saved_sae(folder):
    torch.manual_seed(0)
    sae = build("topk", 8, 32, k=4)
    sae.save(folder)
    (folder / "probes").mkdir()
    (folder / "probes" / "misalignment.json").write_text('{"weights": [1, 2]}')
    return sae


@pytest.mark.parametrize("kind", ["s3", "folder"])
def test_a_published_sae_is_fetched_whole_on_another_node(tmp_path, kind, request):
    """A store on S3, or a shared folder (an NFS mount) given as a plain path."""
    if kind == "s3":
        uri = request.getfixturevalue("s3_server").uri("saes")
    else:
        uri = str(tmp_path / "shared" / "saes")
    sae = saved_sae(tmp_path / "a" / "saes" / "v1")
    SAEStore(uri, tmp_path / "a" / "saes").publish(tmp_path / "a" / "saes" / "v1", "v1")
    node_b = SAEStore(uri, tmp_path / "b" / "saes")
    assert node_b.has("v1") and not node_b.has("v2")
    folder = node_b.fetch("v1")
    assert folder == tmp_path / "b" / "saes" / "v1"
    for name in ("cfg.json", "sae_weights.safetensors", "probes/misalignment.json"):
        assert (folder / name).read_bytes() == (tmp_path / "a/saes/v1" / name).read_bytes()
    fetched = load(folder)
    assert torch.equal(fetched.W_enc, sae.W_enc) and torch.equal(fetched.b_dec, sae.b_dec)
    assert not [p for p in (tmp_path / "b" / "saes").iterdir() if p.name.startswith(".")]


def test_a_registered_sae_missing_on_this_node_comes_from_the_store(tmp_path, s3_server):
    """The catalog records the training node's folder; a node without it (here: the
    folder deleted) loads the version from the store instead."""
    cfg = build_config({"home": str(tmp_path / "home"), "sae": {"store_uri": s3_server.uri()}})
    trained_at = tmp_path / "trainer" / "saes" / "v1"
    sae = saved_sae(trained_at)
    with Catalog(cfg.catalog_path, cfg.lake_location) as cat:
        cat.register_sae(
            "v1", trained_at, architecture="topk", model=cfg.model.name, layer=1, d_in=8,
            d_sae=32, k=4, metrics={},
        )  # fmt: skip
        SAEStore(cfg.sae.store_uri, tmp_path / "unused").publish(trained_at, "v1")
        shutil.rmtree(trained_at)
        choice = registered_sae(cfg, cat, "v1")
    assert choice.path == cfg.sae_dir / "v1"
    assert torch.equal(load(choice.path).W_dec, sae.W_dec)


def test_what_is_not_whole_in_the_store_is_refused(tmp_path, s3_server):
    uri = s3_server.uri("saes")
    store = SAEStore(uri, tmp_path / "cache")
    with pytest.raises(SAEFormatError, match=r"'nope' is not in the SAE store s3://"):
        store.fetch("nope")
    # weights uploaded but no cfg.json (a publisher that died half way): not a version
    saved_sae(tmp_path / "half")
    (tmp_path / "half" / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match="not an SAE folder"):
        store.publish(tmp_path / "half", "half")
    with (
        store.store.writing("half/sae_weights.safetensors") as where,
        store.store.fs.open_output_stream(where) as out,
    ):
        out.write((tmp_path / "half" / "sae_weights.safetensors").read_bytes())
    assert not store.has("half")
    with pytest.raises(SAEFormatError, match="'half' is not in the SAE store"):
        store.fetch("half")
    assert not (tmp_path / "cache" / "half").exists()


def test_an_unreachable_store_is_a_clear_error(tmp_path):
    store = SAEStore(
        "s3://bucket/saes?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1",
        tmp_path,
    )
    with pytest.raises(SAEFormatError, match="cannot read the SAE store s3://bucket.*connect"):
        store.fetch("v1")
