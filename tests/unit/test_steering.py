"""Steering hooks on tiny random-weight models: the steered site's output is exactly the
formula, capture sees the steered stream, turning it off restores the model, and a steer
that does not fit the model is refused by field."""

import dataclasses

import pytest
import torch

from featurewatch.actors.replica_controls import read_user_config
from featurewatch.capture.hooks import ActivationCapture
from featurewatch.capture.models import load_model
from featurewatch.capture.steering import Steer, Steering, steer_from_sae
from featurewatch.sae.model import build


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tiny_llama_dir, tiny_gpt2_dir):
    folder = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return load_model(folder)


def hidden(model, enc, layer):
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states[layer + 1]


@pytest.fixture
def sae():
    torch.manual_seed(0)
    sae = build("topk", 64, 32, k=4)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


def test_subtract_and_clamp_follow_their_formulas(tiny, sae):
    model, tok = tiny
    enc = tok(["the quick brown fox"], return_tensors="pt")
    layer = 1
    before, after = hidden(model, enc, layer), hidden(model, enc, layer + 1)
    steering = Steering(model)

    steering.set([steer_from_sae(sae, 5, layer=layer, site="resid_post", scale=3.0)])
    d = sae.W_dec[5].detach()
    torch.testing.assert_close(hidden(model, enc, layer), before - 3.0 * d / d.norm())
    # the layers after the steered one see the change too
    assert not torch.allclose(hidden(model, enc, layer + 1), after, atol=1e-3)

    # clamp the feature that fires most here, so the formula is exercised, not only its 0
    fid = int(sae.encode(before[0]).sum(0).argmax())
    steering.set([steer_from_sae(sae, fid, layer=layer, site="resid_post", mode="clamp")])
    w, b_enc, b_dec = sae.W_enc[:, fid].detach(), sae.b_enc[fid].detach(), sae.b_dec.detach()
    activation = torch.relu((before - b_dec) @ w + b_enc)
    expected = before - activation.unsqueeze(-1) * sae.W_dec[fid].detach()
    assert (activation > 0).any()
    torch.testing.assert_close(hidden(model, enc, layer), expected, rtol=1e-4, atol=1e-4)

    steering.set([])  # off
    torch.testing.assert_close(hidden(model, enc, layer), before)


def test_capture_samples_the_steered_stream(tiny_llama_dir, sae):
    model, tok = load_model(tiny_llama_dir)
    enc = tok(["basil on a windowsill"], return_tensors="pt")
    before = hidden(model, enc, 2)
    with ActivationCapture(model, [2], store_dtype=torch.float32) as capture:
        Steering(model).set([steer_from_sae(sae, 3, layer=2, site="resid_post", scale=2.0)])
        capture.start(enc["attention_mask"])
        with torch.no_grad():
            model(**enc)
        (chunk,) = capture.finish()
    d = sae.W_dec[3].detach()
    torch.testing.assert_close(chunk.vectors, (before - 2.0 * d / d.norm())[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer": 4}, "steering.layer 4 is out of range: the model has 4"),
        ({"site": "attn"}, "steering.site must be one of"),
        ({"mode": "flip"}, "steering.mode must be one of subtract, clamp"),
        ({"scale": 0.0}, "steering.scale must be positive"),
        ({"direction": (1.0,) * 8}, "steering.direction has 8 values, the model's width is 64"),
        ({"direction": (0.0,) * 64}, "steering.direction must be finite and non-zero"),
        ({"mode": "clamp", "encoder": ()}, "steering.encoder must have 64 values"),
    ],
)
def test_bad_steers_are_refused_and_the_old_ones_kept(tiny_llama_dir, sae, change, message):
    model, _ = load_model(tiny_llama_dir)
    steering = Steering(model)
    good = steer_from_sae(sae, 1, layer=0, site="resid_post")
    steering.set([good])
    with pytest.raises(ValueError, match=message):
        steering.set([dataclasses.replace(good, **change)])
    assert steering.steers == [good]
    with pytest.raises(ValueError, match="feature 32 is not in the SAE"):
        steer_from_sae(sae, 32, layer=0, site="resid_post")
    assert isinstance(good, Steer)


@pytest.mark.parametrize(
    ("canary", "message"),
    [
        ({"app": "c", "share": 0}, "canary share must be a number in"),
        ({"app": "c", "share": 1.5}, "canary share must be a number in"),
        ({"app": "c", "share": "0.5"}, "canary share must be a number in"),
        ({"app": "c", "share": True}, "canary share must be a number in"),
        ({"app": "", "share": 0.5}, "canary app must be a non-empty string"),
        ({"app": 3, "share": 0.5}, "canary app must be a non-empty string"),
        ({"app": "c"}, "canary must be"),
        ({"app": "c", "share": 0.5, "extra": 1}, "canary must be"),
        ("c", "canary must be"),
    ],
)
def test_a_replicas_user_config_is_read_exactly(sae, canary, message):
    """Both replicas read Serve's user_config with read_user_config: a bad canary route
    is refused by name (the replica then keeps its settings), types are not coerced."""
    steer = steer_from_sae(sae, 1, layer=0, site="resid_post")
    steers, route, verdicts = read_user_config(
        {"steering": [dataclasses.asdict(steer)], "canary": {"app": "c", "share": 1}}
    )
    assert steers == [steer] and route == {"app": "c", "share": 1.0} and verdicts is None
    assert read_user_config(None) == ([], None, None)
    with pytest.raises(ValueError, match=r"unknown user_config keys \['steer'\]"):
        read_user_config({"steer": []})
    with pytest.raises(ValueError, match="verdicts: tags"):
        read_user_config({"verdicts": {"tags": []}})
    with pytest.raises(ValueError, match=message):
        read_user_config({"steering": [], "canary": canary})
    with pytest.raises(TypeError):
        read_user_config({"steering": [{"layer": 0, "nope": 1}]})
