"""Sampling policies: request fraction, vectors/s budget, always-sample, layers x sites."""

import pytest
import torch

from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.hooks import ActivationCapture
from featurewatch.capture.models import load_model
from featurewatch.capture.sampler import SamplingPolicy


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_request_fraction_chooses_whole_requests():
    policy = SamplingPolicy(1.0, request_fraction=0.3, seed=3)
    chosen, _ = policy.select_requests([False] * 20_000)
    assert abs(chosen.float().mean().item() - 0.3) < 0.02
    mask = policy.token_mask((4, 5), torch.tensor([True, False, True, False]))
    assert mask[[0, 2]].all() and not mask[[1, 3]].any()


def test_always_rows_bypass_fractions_and_budget():
    clock = FakeClock()
    policy = SamplingPolicy(0.0, request_fraction=0.0, max_vectors_per_s=1, clock=clock)
    chosen, always = policy.select_requests([False, True, False])
    assert chosen.tolist() == [False, True, False]
    mask = policy.apply_budget(policy.token_mask((3, 50), chosen, always), always)
    assert mask[1].all() and not mask[[0, 2]].any()


def test_budget_caps_vectors_per_second():
    clock = FakeClock()
    policy = SamplingPolicy(1.0, max_vectors_per_s=100, seed=0, clock=clock)
    kept = 0
    for _ in range(50):  # 5 simulated seconds, 10 calls a second, 64 tokens each
        clock.now += 0.1
        kept += int(policy.apply_budget(policy.token_mask((8, 8))).sum())
    # 100 in the initial bucket + 100/s for 5 s
    assert 580 <= kept <= 600
    assert policy.budget_dropped == 50 * 64 - kept


def test_same_seed_same_positions():
    a = SamplingPolicy(0.4, request_fraction=0.5, seed=11)
    b = SamplingPolicy(0.4, request_fraction=0.5, seed=11)
    for _ in range(3):
        ca, _ = a.select_requests([False] * 8)
        cb, _ = b.select_requests([False] * 8)
        assert torch.equal(ca, cb)
        assert torch.equal(a.token_mask((8, 30), ca), b.token_mask((8, 30), cb))


@pytest.mark.parametrize("bad", [{"token_fraction": -0.1}, {"request_fraction": 2}])
def test_bad_fractions(bad):
    args = {"token_fraction": 1.0, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingPolicy(args.pop("token_fraction"), **args)


def test_generation_honours_request_choice_and_always(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    policy = SamplingPolicy(1.0, request_fraction=0.0)
    cap = ActivationCapture(model, [0, 2], ["resid_post", "mlp_out"], policy)
    chats = [[{"role": "user", "content": f"the quick brown fox {i}"}] for i in range(3)]
    with cap:
        result = BatchGenerator(model, tok, cap).generate(
            chats, [4, 4, 4], always_sample=[False, True, False]
        )
    points = {(c.layer, c.site) for c in result.captured}
    assert points == {(0, "resid_post"), (0, "mlp_out"), (2, "resid_post"), (2, "mlp_out")}
    for captured in result.captured:
        assert set(captured.request_index.tolist()) == {1}
