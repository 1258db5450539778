"""TopK SAE: shapes, sparse/dense agreement, SAELens-layout files, refusal of bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from featurewatch.errors import SAEFormatError
from featurewatch.sae import TopKSAE, load
from featurewatch.sae.train import (
    evaluate,
    init_from_data,
    normalize_decoder,
    reconstruction_loss,
)


def random_sae(d_in=16, d_sae=64, k=4) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


def test_shapes_and_sparsity():
    sae = random_sae()
    x = torch.randn(10, 16)
    idx, vals = sae.encode_sparse(x)
    assert idx.shape == vals.shape == (10, 4)
    z = sae.encode(x)
    assert z.shape == (10, 64)
    assert ((z > 0).sum(dim=1) <= 4).all()
    assert (vals >= 0).all()
    assert sae.decode(z).shape == (10, 16)


def test_sparse_and_dense_paths_agree():
    sae = random_sae()
    x = torch.randn(10, 16)
    idx, vals = sae.encode_sparse(x)
    z = sae.encode(x)
    # the k kept latents are the largest pre-activations
    pre = sae.pre_activations(x)
    top = pre.topk(4).values
    torch.testing.assert_close(vals.sort(dim=1).values, torch.relu(top).sort(dim=1).values)
    torch.testing.assert_close(sae.decode_sparse(idx, vals), sae.decode(z), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_in_saelens_layout(tmp_path):
    sae = random_sae()
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 16 and cfg["d_sae"] == 64
    assert cfg["k"] == 4 and cfg["apply_b_dec_to_input"] is True
    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (16, 64) and tensors["W_dec"].shape == (64, 16)
    loaded = load(tmp_path / "sae")
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def _corrupt(tmp_path, cfg_change=None, tensors_change=None):
    folder = tmp_path / "bad"
    random_sae().save(folder)
    if cfg_change:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg_change(cfg)
        (folder / "cfg.json").write_text(json.dumps(cfg))
    if tensors_change:
        tensors = load_file(str(folder / "sae_weights.safetensors"))
        tensors_change(tensors)
        save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def test_bad_files_are_refused_by_name(tmp_path):
    with pytest.raises(SAEFormatError, match="missing tensor W_dec"):
        load(_corrupt(tmp_path, tensors_change=lambda t: t.pop("W_dec")))
    with pytest.raises(SAEFormatError, match="W_enc has shape"):
        load(_corrupt(tmp_path, cfg_change=lambda c: c.update(d_sae=32)))
    with pytest.raises(SAEFormatError, match="unknown architecture 'gated'"):
        load(_corrupt(tmp_path, cfg_change=lambda c: c.update(architecture="gated")))
    with pytest.raises(SAEFormatError, match="monitored layer has width 576"):
        load(_corrupt(tmp_path), expected_d_in=576)
    with pytest.raises(SAEFormatError, match="missing cfg.json"):
        load(tmp_path / "nowhere")


def test_training_step_reduces_reconstruction_error():
    torch.manual_seed(1)
    # data on a few directions: a TopK SAE can learn it
    basis = torch.randn(8, 16)
    codes = torch.relu(torch.randn(2048, 8)) * (torch.rand(2048, 8) < 0.3)
    x = codes @ basis + 0.01 * torch.randn(2048, 16)
    sae = TopKSAE(16, 32, 4)
    init_from_data(sae, x)
    before = evaluate(sae, x)["fvu"]
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(300):
        batch = x[torch.randint(0, 2048, (128,))]
        loss = reconstruction_loss(batch, sae(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        normalize_decoder(sae)
    after = evaluate(sae, x)
    assert after["fvu"] < 0.5 * before
    assert after["fvu"] < 0.2
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
