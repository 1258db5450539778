"""Offline gathering spools the right vectors; CE-loss recovered has its hand-computed
end points: a perfect reconstruction recovers 1.0, an all-zero one 0.0."""

import pytest
import torch

from featurewatch.analysis.corpus import SOURCES, documents, is_held_out
from featurewatch.capture.hooks import find_decoder_layers
from featurewatch.capture.models import load_model
from featurewatch.config import build_config
from featurewatch.platform.jobs.gather import gather_activations, padded_batches, token_chunks
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import unpack_vectors
from featurewatch.sae import ReLUSAE
from featurewatch.sae.evaluate import ce_loss_recovered
from featurewatch.storage.spool import read_segment, sealed_segments


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tiny_llama_dir, tiny_gpt2_dir):
    return load_model(tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir)


def test_corpus_is_large_mixed_and_split_by_document():
    docs = documents()
    sources = {name.split("/")[0] for name, _ in docs}
    assert sources == set(SOURCES)
    assert sum(len(text) for _, text in docs) > 2_000_000
    held = [name for name, _ in docs if is_held_out(name, 0.1)]
    assert 0.05 < len(held) / len(docs) < 0.15
    assert all(is_held_out(n, 0.1) for n in held)  # stable
    with pytest.raises(ValueError, match="unknown corpus source 'wiki'"):
        documents(("wiki",))


def test_gather_spools_the_monitored_layer_without_position_zero(tiny, tmp_path):
    model, tok = tiny
    layer = 1
    cfg = build_config(
        {"home": str(tmp_path), "capture": {"layers": [layer], "wire_dtype": "float32"}}
    )
    report = gather_activations(
        cfg,
        model,
        tok,
        tmp_path / "spool",
        tokens=300,
        seq_len=32,
        batch_size=4,
        progress=False,
    )
    assert report.tokens >= 300
    batches = [
        pb.ActivationBatch.FromString(r)
        for seg in sealed_segments(tmp_path / "spool")
        for r in read_segment(seg)
    ]
    assert sum(b.rows for b in batches) == report.tokens
    first = batches[0]
    assert first.layer == layer and 0 not in first.token_pos
    # the spooled vectors are the layer's output at those positions
    chunks = token_chunks(tok, "train", 32, 0.1)
    _, ids, mask = next(padded_batches(chunks, 4, tok.pad_token_id or 0))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected = hidden.hidden_states[layer + 1][
        torch.tensor(list(first.request_index)), torch.tensor(list(first.token_pos))
    ]
    got = torch.as_tensor(unpack_vectors(first))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def identity_sae(d: int) -> ReLUSAE:
    """relu(x) - relu(-x) = x: a ReLU SAE that reconstructs exactly."""
    sae = ReLUSAE(d, 2 * d, apply_b_dec_to_input=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_ce_loss_recovered_end_points(tiny):
    model, tok = tiny
    d = model.config.hidden_size
    block = find_decoder_layers(model)[1]
    enc = tok(
        ["the quick brown fox jumps", "over the lazy dog again"], return_tensors="pt", padding=True
    )
    batches = [(enc["input_ids"], enc["attention_mask"])]
    perfect = ce_loss_recovered(model, block, identity_sae(d), batches)
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], rel=1e-5)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["ce_zero"] != pytest.approx(perfect["ce_clean"], rel=1e-3)
    zero = ce_loss_recovered(model, block, ReLUSAE(d, 8), batches)
    assert zero["ce_sae"] == pytest.approx(zero["ce_zero"], rel=1e-5)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    # hand-check CE_clean: the model's own loss over the real tokens
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
    assert perfect["ce_clean"] == pytest.approx(float(out.loss), rel=1e-4)
