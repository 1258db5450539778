"""The training pieces: geometric median, schedule, dead-latent tracking, AuxK, and a
real decrease of reconstruction error for each trainable architecture."""

import pytest
import torch

from featurewatch.sae import BatchTopKSAE, ReLUSAE, TopKSAE
from featurewatch.sae.train import (
    DeadLatents,
    SAETrainingStep,
    TrainSettings,
    evaluate,
    geometric_median,
    init_from_data,
    lr_factor,
    normalize_decoder,
)


def test_geometric_median_resists_outliers():
    # Three points on a line: the median is the middle one, the mean is dragged away.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]])
    torch.testing.assert_close(geometric_median(x), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    # Square corners: the centre.
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(geometric_median(x), torch.tensor([1.0, 1.0]))


def test_learning_rate_warms_up_holds_and_decays():
    s = TrainSettings(warmup_steps=10, decay_fraction=0.2)
    assert lr_factor(0, 100, s) == pytest.approx(0.1)
    assert lr_factor(9, 100, s) == pytest.approx(1.0)
    assert lr_factor(50, 100, s) == 1.0
    assert lr_factor(80, 100, s) == pytest.approx(1.0)
    assert lr_factor(90, 100, s) == pytest.approx(0.5)
    assert lr_factor(99, 100, s) == pytest.approx(0.05)


def test_dead_latents_counts_tokens_since_firing():
    dead = DeadLatents(4, dead_after_tokens=100)
    dead.update(torch.tensor([True, False, False, False]), 60)
    assert dead.mask().tolist() == [False, False, False, False]
    dead.update(torch.tensor([False, True, False, False]), 60)
    # latent 0 fired 60 tokens ago; 2 and 3 never in 120
    assert dead.mask().tolist() == [False, False, True, True]
    dead.update(torch.tensor([False, True, False, False]), 40)
    assert dead.mask().tolist() == [True, False, True, True]
    assert dead.fraction() == 0.75


def test_auxk_sends_gradient_to_dead_latents_only_it_can_reach():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=2)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(64, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    # Latents that never make the top-k on this batch get no gradient from the MSE.
    fired = sae.encode(x).gt(0).any(dim=0)
    dead[~fired] = True
    assert dead.any()
    grads = {}
    for coefficient in (0.0, 1.0):
        sae.zero_grad()
        step = SAETrainingStep(sae, TrainSettings(aux_coefficient=coefficient, aux_k=4))
        loss, stats = step(x, dead)
        loss.backward()
        grads[coefficient] = sae.W_enc.grad[:, dead].abs().sum()
        assert coefficient == 0.0 or stats["aux"] > 0
    assert grads[0.0] == 0
    assert grads[1.0] > 0


def sparse_data(n=4096, d_in=16, directions=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(directions, d_in, generator=gen)
    codes = torch.relu(torch.randn(n, directions, generator=gen))
    codes *= torch.rand(n, directions, generator=gen) < 0.15
    return codes @ basis + 0.01 * torch.randn(n, d_in, generator=gen)


@pytest.mark.parametrize(
    "make", [lambda: TopKSAE(16, 48, 4), lambda: BatchTopKSAE(16, 48, 4), lambda: ReLUSAE(16, 48)]
)
def test_training_reduces_reconstruction_error(make):
    torch.manual_seed(2)
    x = sparse_data()
    sae = make()
    init_from_data(sae, x[:1024])
    before = evaluate(sae, x)["fvu"]
    settings = TrainSettings(lr=3e-3, warmup_steps=20, dead_after_tokens=2000, l1_coefficient=0.3)
    step = SAETrainingStep(sae, settings)
    opt = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    dead = DeadLatents(sae.d_sae, settings.dead_after_tokens)
    sae.train()
    for i in range(400):
        for group in opt.param_groups:
            group["lr"] = settings.lr * lr_factor(i, 400, settings)
        batch = x[torch.randint(0, len(x), (128,))]
        loss, stats = step(batch, dead.mask())
        opt.zero_grad()
        loss.backward()
        opt.step()
        normalize_decoder(sae)
        dead.update(stats["fired"], 128)
    after = evaluate(sae, x)
    assert after["fvu"] < 0.5 * before, (before, after)
    assert after["fvu"] < 0.3, after
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(48))
    if not isinstance(sae, ReLUSAE):
        # BatchTopK in eval mode fires about k per token through its threshold
        assert 1.0 <= after["l0"] <= 8.0, after
