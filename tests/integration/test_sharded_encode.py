"""The Ray Data encode chain split over S shard actor pools gives the same features and
reconstruction error as the whole SAE in one process, for every architecture."""

import numpy as np
import pytest
import ray
import torch

from featurewatch.actors.sae_encoder import sharded_encode
from featurewatch.sae import JumpReLUSAE, build

D_IN, D_SAE, TOKENS = 32, 256, 600


def random_sae(arch):
    torch.manual_seed(11)
    sae = build(arch, D_IN, D_SAE, k=8)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
        sae.b_enc.sub_(1.0)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.uniform_(0.0, 0.5)
    return sae.eval()


def run(ds, sae, shards):
    rows = sharded_encode(ds, sae, shards, batch_size=128, cpus_per_actor=0.25).take_all()
    rows.sort(key=lambda r: r["token"])
    out = []
    for r in rows:
        keep = r["feature_values"] > 0
        out.append(
            (
                dict(
                    zip(
                        r["feature_ids"][keep].tolist(),
                        r["feature_values"][keep].tolist(),
                        strict=True,
                    )
                ),
                float(r["recon_error"]),
            )
        )
    return out


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "standard"])
def test_sharded_chain_matches_the_whole_sae(ray_cluster, arch):
    sae = random_sae(arch)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(TOKENS, D_IN)).astype(np.float32)
    ds = ray.data.from_items(
        [{"token": i, "vector": vectors[i]} for i in range(TOKENS)], override_num_blocks=4
    )
    whole = run(ds, sae, 1)
    sharded = run(ds, sae, 3)
    assert len(whole) == len(sharded) == TOKENS
    # against the in-process SAE as well
    x = torch.from_numpy(vectors)
    z = sae.encode(x)
    for i, ((feats, err), (feats3, err3)) in enumerate(zip(whole, sharded, strict=True)):
        expected = {j: float(z[i, j].detach()) for j in torch.nonzero(z[i]).flatten().tolist()}
        assert feats.keys() == feats3.keys() == expected.keys()
        for j, v in expected.items():
            assert feats[j] == pytest.approx(v, rel=1e-4, abs=1e-5)
            assert feats3[j] == pytest.approx(v, rel=1e-4, abs=1e-5)
        assert err3 == pytest.approx(err, rel=1e-4, abs=1e-6)
    assert sum(len(f) for f, _ in whole) > TOKENS  # not a vacuous comparison
