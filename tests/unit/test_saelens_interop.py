"""Files move both ways between SAELens (the real `sae-lens` package) and featurewatch:
an SAE saved by one loads in the other and encodes and decodes to the same values."""

import pytest
import torch
from sae_lens import SAE as SAELensSAE
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from featurewatch.sae import build, load

D_IN, D_SAE, K = 24, 128, 6


def saelens_sae(arch: str):
    torch.manual_seed(7)
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.normal_()
            if name == "threshold":
                p.abs_()
        sae.b_enc.sub_(2.0)
    return sae


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_file_loads_here_with_the_same_outputs(tmp_path, arch):
    theirs = saelens_sae(arch)
    theirs.save_model(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert ours.architecture == arch
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        z = theirs.encode(x)
        assert (z > 0).any()
        torch.testing.assert_close(ours.encode(x), z)
        indices, values = ours.encode_sparse(x)
        dense = torch.zeros(50, D_SAE).scatter_add_(1, indices, values)
        torch.testing.assert_close(dense, z)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "batchtopk"])
def test_file_saved_here_loads_in_saelens(tmp_path, arch):
    torch.manual_seed(3)
    ours = build(arch, D_IN, D_SAE, k=K)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
        ours.b_enc.sub_(2.0)
        if hasattr(ours, "threshold"):
            ours.threshold.abs_()
    ours.eval().save(tmp_path / "sae")
    theirs = SAELensSAE.load_from_disk(tmp_path / "sae")
    expected = {"batchtopk": "jumprelu"}.get(arch, arch)
    assert theirs.cfg.architecture() == expected
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        z = ours.encode(x)
        assert (z > 0).any()
        torch.testing.assert_close(theirs.encode(x), z)
        torch.testing.assert_close(theirs.decode(z), ours.decode(z), atol=1e-5, rtol=1e-5)
