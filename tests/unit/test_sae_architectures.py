"""Every SAE architecture: dense/sparse/decode agree, files round-trip, BatchTopK infers
as a JumpReLU, and sharding by latent ranges reproduces the unsharded SAE exactly."""

import json

import pytest
import torch

from featurewatch.errors import SAEFormatError
from featurewatch.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, build, load
from featurewatch.sae.model import TOPK_BLOCK, row_topk
from featurewatch.sae.shard import (
    decoder_shards,
    encoder_shards,
    merge_candidates,
    shard_ranges,
)

D_IN, D_SAE = 16, 96


def random_sae(architecture: str, seed: int = 0):
    torch.manual_seed(seed)
    sae = build(architecture, D_IN, D_SAE, k=5)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.b_enc.sub_(2.0)  # ReLU/JumpReLU: a few latents per token, not half of them
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.uniform_(0.0, 1.5)
    return sae.eval()


def dense(indices, values, d_sae=D_SAE):
    return torch.zeros(indices.shape[0], d_sae).scatter_add_(1, indices, values.float())


ARCHS = ["standard", "topk", "jumprelu"]


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_dense_and_decode_agree(arch):
    sae = random_sae(arch)
    x = torch.randn(40, D_IN)
    z = sae.encode(x)
    indices, values = sae.encode_sparse(x)
    torch.testing.assert_close(dense(indices, values), z)
    torch.testing.assert_close(sae.decode_sparse(indices, values), sae.decode(z))
    assert (z >= 0).all() and (z > 0).any()


def test_activation_rules():
    x = torch.randn(30, D_IN)
    relu, topk, jump = (random_sae(a) for a in ARCHS)
    pre = relu.pre_activations(x)
    torch.testing.assert_close(relu.encode(x), torch.relu(pre))
    z = topk.encode(x)
    assert ((z > 0).sum(dim=1) <= 5).all()
    kth = topk.pre_activations(x).topk(5).values[:, -1:]
    assert ((z > 0) <= (topk.pre_activations(x) >= kth)).all()
    pre = jump.pre_activations(x)
    torch.testing.assert_close(jump.encode(x), torch.relu(pre) * (pre > jump.threshold))


def sorted_pairs(values, indices):
    order = indices.argsort(dim=-1)
    return indices.gather(1, order), values.gather(1, order)


@pytest.mark.parametrize("k", [1, 8, 32])
def test_row_topk_equals_torch_topk(k):
    torch.manual_seed(k)
    pre = torch.randn(64, 64 * TOPK_BLOCK)
    # Rows whose winners crowd into one block, or sit at the last columns, or are all
    # negative: the block pass must still find every one of them.
    pre[0, 5 * TOPK_BLOCK : 5 * TOPK_BLOCK + k] += 100.0
    pre[1, -k:] += 100.0
    pre[2] = -pre[2].abs() - 1.0
    got = sorted_pairs(*row_topk(pre, k))
    want = sorted_pairs(*pre.topk(k, dim=-1, sorted=False))
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_row_topk_passes_gradients_and_falls_back_on_odd_widths():
    pre = torch.randn(4, 64 * TOPK_BLOCK, requires_grad=True)
    values, indices = row_topk(pre, 16)
    values.sum().backward()
    expected = torch.zeros_like(pre).scatter_(1, indices, 1.0)
    assert torch.equal(pre.grad, expected)
    odd = torch.randn(3, 100)  # not a multiple of the block: plain topk
    assert torch.equal(
        sorted_pairs(*row_topk(odd, 7))[0], sorted_pairs(*odd.topk(7, sorted=False))[0]
    )


def test_batchtopk_trains_on_the_batch_and_infers_with_its_threshold(tmp_path):
    sae = BatchTopKSAE(D_IN, D_SAE, k=4)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "threshold":
                p.normal_()
    x = torch.randn(50, D_IN)
    sae.train()
    z = sae.encode(x)
    # k x batch latents across the batch, not k per row
    assert int((z > 0).sum()) == 4 * 50
    assert ((z > 0).sum(dim=1) != 4).any()
    smallest_kept = float(z[z > 0].min().detach())
    assert float(sae.threshold[0]) == pytest.approx(smallest_kept, rel=1e-6)
    sae.eval()
    pre = sae.pre_activations(x)
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > sae.threshold))
    sae.save(tmp_path / "btk")
    cfg = json.loads((tmp_path / "btk" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["trained_as"] == "batchtopk" and cfg["metadata"]["k"] == 4
    loaded = load(tmp_path / "btk")
    assert isinstance(loaded, JumpReLUSAE)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, arch, dtype):
    sae = random_sae(arch).to(dtype)
    sae.save(tmp_path / arch)
    loaded = load(tmp_path / arch)
    assert type(loaded) is type(sae) and loaded.dtype == dtype
    x = torch.randn(8, D_IN)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_build_refuses_unknown_architecture():
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'"):
        build("gated", 4, 8)
    assert isinstance(build("relu", 4, 8), ReLUSAE)
    with pytest.raises(ValueError, match="k must be in"):
        TopKSAE(4, 8, 9)


def _saved(tmp_path, arch="jumprelu", **cfg_changes):
    folder = random_sae(arch).save(tmp_path / f"bad-{len(list(tmp_path.iterdir()))}")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(cfg_changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_bad_files_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors.pop("threshold")
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="missing tensor threshold"):
        load(folder)

    folder = _saved(tmp_path, "topk")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["b_dec"][3] = float("nan")
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="b_dec contains NaN"):
        load(folder)

    cases = [
        ({"normalize_activations": "layer_norm"}, "normalize_activations = 'layer_norm'"),
        ({"d_in": 0}, "d_in must be a positive integer"),
        ({"d_sae": "96"}, "d_sae must be a positive integer"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"d_sae": 48}, r"W_enc has shape \(16, 96\), cfg.json implies \(16, 48\)"),
    ]
    for change, message in cases:
        with pytest.raises(SAEFormatError, match=message):
            load(_saved(tmp_path, **change))
    with pytest.raises(SAEFormatError, match="k = 500 exceeds d_sae"):
        load(_saved(tmp_path, "topk", k=500))
    with pytest.raises(SAEFormatError, match="k must be a positive integer"):
        load(_saved(tmp_path, "topk", k=None))
    folder = _saved(tmp_path)
    (folder / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SAEFormatError, match="must hold a JSON object"):
        load(folder)


def test_shard_ranges_cover_the_dictionary():
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(10, 1) == [(0, 10)]
    with pytest.raises(ValueError, match="num_shards"):
        shard_ranges(4, 5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_sharded_encoding_equals_unsharded(arch, num_shards):
    sae = random_sae(arch, seed=num_shards)
    x = torch.randn(64, D_IN)
    parts = [shard.candidates(x) for shard in encoder_shards(sae, num_shards)]
    k = getattr(sae, "k", None)
    indices, values = merge_candidates(parts, sae.architecture, k)
    ref_indices, ref_values = sae.encode_sparse(x)
    # same latents with the same values, row by row
    torch.testing.assert_close(dense(indices, values), dense(ref_indices, ref_values))
    active = values > 0
    ref_active = ref_values > 0
    for row in range(x.shape[0]):
        assert set(indices[row][active[row]].tolist()) == set(
            ref_indices[row][ref_active[row]].tolist()
        )
    shares = [s.contribution(indices, values) for s in decoder_shards(sae, num_shards)]
    recon = sae.b_dec + sum(shares)
    torch.testing.assert_close(recon, sae.decode_sparse(ref_indices, ref_values))


def test_each_shard_holds_only_its_slice():
    sae = random_sae("topk")
    shards = encoder_shards(sae, 4)
    assert sum(s.W_enc.shape[1] for s in shards) == D_SAE
    assert all(s.W_enc.shape == (D_IN, s.stop - s.start) for s in shards)
    assert all(s.W_dec.shape == (s.stop - s.start, D_IN) for s in decoder_shards(sae, 4))
