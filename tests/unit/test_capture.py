"""Hooks capture the right tensor at the right layer, for prompt and generated tokens."""

import pytest
import torch

from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.hooks import ActivationCapture, find_decoder_layers
from featurewatch.capture.models import load_model
from featurewatch.capture.sampler import TokenSampler


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tiny_llama_dir, tiny_gpt2_dir):
    folder = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return load_model(folder)


def test_resid_post_matches_hidden_states(tiny):
    model, tok = tiny
    enc = tok(["the quick brown fox", "basil"], return_tensors="pt", padding=True)
    layer = 2
    with ActivationCapture(model, [layer], "resid_post", store_dtype=torch.float32) as cap:
        cap.start(enc["attention_mask"])
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        chunks = cap.finish()
    (chunk,) = chunks
    expected = out.hidden_states[layer + 1][chunk.rows, chunk.positions]
    torch.testing.assert_close(chunk.vectors, expected)
    # every real token is captured, no padding
    assert len(chunk.rows) == int(enc["attention_mask"].sum())
    assert bool(enc["attention_mask"][chunk.rows, chunk.positions].all())


def test_mlp_out_site_matches_the_mlp_module(tiny):
    model, tok = tiny
    enc = tok(["the quick brown fox"], return_tensors="pt")
    seen = {}
    mlp = find_decoder_layers(model)[1].mlp
    handle = mlp.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach()))
    with ActivationCapture(model, [1], "mlp_out", store_dtype=torch.float32) as cap:
        cap.start(enc["attention_mask"])
        with torch.no_grad():
            model(**enc)
        (chunk,) = cap.finish()
    handle.remove()
    torch.testing.assert_close(chunk.vectors, seen["out"][chunk.rows, chunk.positions])


def test_batched_kv_cached_generation_captures_each_row_correctly(tiny):
    """Vectors captured during padded, KV-cached batch generation equal a plain forward
    of each row's own unpadded sequence at the same token positions."""
    model, tok = tiny
    layer = 1
    cap = ActivationCapture(model, [layer], "resid_post", store_dtype=torch.float32)
    gen = BatchGenerator(model, tok, cap)
    chats = [
        [{"role": "user", "content": "basil"}],
        [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}],
    ]
    with cap:
        result = gen.generate(chats, max_tokens=[5, 9])
    assert result.completion_tokens[0] <= 5 and result.completion_tokens[1] <= 9
    (captured,) = result.captured
    for row, chat in enumerate(chats):
        prompt_ids = tok(gen.prompt_text(chat), add_special_tokens=False)["input_ids"]
        mine = captured.request_index == row
        positions = captured.token_pos[mine]
        assert positions.min() == 0
        # prompt tokens and generated tokens (except possibly the final one) are captured
        n_total = len(prompt_ids) + result.completion_tokens[row]
        assert n_total - 1 <= int(mine.sum()) <= n_total
        ids = captured.token_id[mine][positions.argsort()]
        assert ids[: len(prompt_ids)].tolist() == prompt_ids
        with torch.no_grad():
            full = model(ids.unsqueeze(0), output_hidden_states=True).hidden_states[layer + 1][0]
        torch.testing.assert_close(captured.vectors[mine], full[positions], atol=2e-4, rtol=2e-3)


def test_layer_out_of_range_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="capture.layer 99"):
        ActivationCapture(model, [99])


def test_sampler_rate_and_reproducibility():
    mask = TokenSampler(0.3, seed=7).mask((200, 500))
    assert abs(mask.float().mean().item() - 0.3) < 0.01
    assert torch.equal(mask, TokenSampler(0.3, seed=7).mask((200, 500)))
    assert not torch.equal(mask, TokenSampler(0.3, seed=8).mask((200, 500)))
    assert TokenSampler(0.0).mask((3, 4)).sum() == 0
    assert TokenSampler(1.0).mask((3, 4)).all()
    with pytest.raises(ValueError):
        TokenSampler(1.2)


def test_sampling_fraction_applies_during_generation(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    chats = [[{"role": "user", "content": f"the quick brown fox {i}"}] for i in range(8)]
    counts = {}
    for fraction in (1.0, 0.25):
        cap = ActivationCapture(model, [0], sampler=TokenSampler(fraction, seed=1))
        with cap:
            result = BatchGenerator(model, tok, cap).generate(chats, [8] * 8)
        counts[fraction] = sum(len(c.token_pos) for c in result.captured)
    assert 0.1 < counts[0.25] / counts[1.0] < 0.4
