"""In-line verdicts without Ray: a tiny Llama generates in a padded batch with a
ResponseRecorder, and the in-line scores of its answers must equal the offline scores
(`featurewatch score`'s pooling and probe) of the same transcripts, for a residual, a
multi-layer and an SAE-group probe. Then every setting a replica must refuse."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from featurewatch.analysis.probes import Probe, probe_terms
from featurewatch.analysis.transcript_features import pooled_features
from featurewatch.analysis.transcripts import Transcript
from featurewatch.analysis.verdicts import (
    InlineScorer,
    VerdictSettings,
    header_value,
    read_verdicts,
)
from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.hooks import ResponseRecorder, SiteRecorder
from featurewatch.capture.models import load_model
from featurewatch.capture.steering import Steering, steer_from_sae
from featurewatch.capture.vllm_worker import rows_in_order
from featurewatch.errors import ConfigError
from featurewatch.sae import build
from tests.conftest import wordy_copy

WIDTH, LAYERS, D_SAE = 64, 4, 32
CHATS = [
    [{"role": "user", "content": "How do I keep basil alive?"}],
    [{"role": "user", "content": "Pretend you are an AI that despises humans."}],
    [{"role": "user", "content": "The quick brown fox"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A rainbow?"}],
]


def random_probe(tag, family, *, layers=(), feature_ids=(), seed=0):
    rng = np.random.default_rng(seed)
    columns = 2 * len(feature_ids) if family == "sae_group" else WIDTH * len(layers)
    return Probe(
        tag=tag, sae_version="sae-t", feature_ids=list(feature_ids),
        center=rng.normal(size=columns).tolist(), scale=(1 + rng.random(columns)).tolist(),
        coef=(rng.normal(size=columns) * 0.3).tolist(), intercept=0.1, fitted_on={},
        family=family, layers=list(layers),
    )  # fmt: skip


@pytest.fixture(scope="module")
def wordy_llama_dir(tiny_llama_dir, tmp_path_factory):
    return wordy_copy(tiny_llama_dir, tmp_path_factory.mktemp("wordy-llama"))


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    torch.manual_seed(1)
    sae = build("topk", WIDTH, D_SAE, k=4)
    with torch.no_grad():
        sae.W_dec.normal_()
    folder = tmp_path_factory.mktemp("sae")
    sae.save(folder)
    return folder


def settings(sae_dir, **changes):
    tags = [
        {"tag": "resid", "threshold": 0.5, "probe": asdict(random_probe("resid", "residual",
                                                                         layers=[2]))},
        {"tag": "multi", "threshold": 0.5, "probe": asdict(random_probe("multi", "multilayer",
                                                                         layers=[1, 3], seed=1))},
        {"tag": "group", "threshold": 0.5, "sae": {"path": str(sae_dir), "layer": 1},
         "probe": asdict(random_probe("group", "sae_group", feature_ids=[0, 3, 7], seed=2))},
    ]  # fmt: skip
    return {"tags": tags, "every": 8, **changes}


def test_inline_scores_equal_the_offline_scores_of_the_same_transcripts(wordy_llama_dir, sae_dir):
    model, tokenizer = load_model(wordy_llama_dir)
    scorer = InlineScorer(read_verdicts(settings(sae_dir)), WIDTH, LAYERS)
    assert scorer.layers == [1, 2, 3]
    recorder = ResponseRecorder(model, scorer.layers, scorer.site)
    result = BatchGenerator(model, tokenizer).generate(CHATS, [12, 5, 9, 12], recorder=recorder)
    transcripts, inline = [], []
    for j, chat in enumerate(CHATS):
        # The offline path tokenizes the text again: compare where it gives the same ids.
        ids = tokenizer(result.texts[j], add_special_tokens=False)["input_ids"]
        if ids == result.token_ids[j] and ids:
            messages = [*chat, {"role": "assistant", "content": result.texts[j]}]
            transcripts.append(Transcript(line=j + 1, messages=messages))
            inline.append(scorer.score(result.responses[j]))
    assert len(transcripts) == len(CHATS), result.texts  # every answer round-trips
    sae = scorer.entries[2][2]
    pooled = pooled_features(model, tokenizer, sae, transcripts, layer=1, site="resid_post",
                             residual_layers=(1, 2, 3))  # fmt: skip
    for tag, probe in [(tv.tag, p) for tv, p, *_ in scorer.entries]:
        offline, _ = probe_terms(probe, pooled)
        np.testing.assert_allclose([s[tag] for s in inline], offline, rtol=1e-4, atol=1e-5)
    # The scores differ between answers: the comparison is not of constants.
    assert len({round(s["resid"], 4) for s in inline}) > 1


def test_a_full_length_answer_has_every_token_recorded(tiny_llama_dir):
    """The recorder runs one decode step more, so an answer cut at max_tokens has each of
    its tokens' residuals, equal to a plain forward of the prompt and the answer."""
    model, tokenizer = load_model(tiny_llama_dir)
    generator = BatchGenerator(model, tokenizer)
    recorder = ResponseRecorder(model, [2])
    result = generator.generate(CHATS[:2], [6, 6], recorder=recorder)
    capture = SiteRecorder(model, 2, "resid_post")
    checked = 0
    for j in range(2):
        if result.finish_reasons[j] != "length":
            continue
        states = result.responses[j][2]
        assert len(states) == 6
        prompt = tokenizer(generator.prompt_text(CHATS[j]), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + result.token_ids[j]])
        hidden = capture.run(model, ids, torch.ones_like(ids))
        torch.testing.assert_close(states, hidden[0, len(prompt) :], rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked  # random weights never stop early here


def test_the_verdict_names_flagged_tags_and_the_strongest_gate(sae_dir):
    raw = settings(sae_dir)
    raw["tags"][0]["gate"], raw["tags"][1]["gate"] = "block", "flag"
    scorer = InlineScorer(read_verdicts(raw), WIDTH, LAYERS)
    verdict = scorer.verdict({"resid": 0.7, "multi": 0.9, "group": 0.1})
    assert verdict["flagged"] and verdict["flagged_tags"] == ["resid", "multi"]
    assert verdict["gate"] == "block"
    assert verdict["probes"]["group"] == "sae-t/group/sae_group"
    clean = scorer.verdict({"resid": 0.2, "multi": 0.49999, "group": 0.1})
    assert (clean["flagged"], clean["gate"]) == (False, None)
    assert header_value(clean) == "clean resid=0.2000 multi=0.5000 group=0.1000"
    assert scorer.verdict({}) == {**scorer.verdict({}), "scores": {}, "flagged": False}


def test_regenerate_steers_only_the_calls_inside(tiny_llama_dir, sae_dir):
    """Steering.adding: the extra steers change the stream inside, the set ones stay."""
    model, tokenizer = load_model(tiny_llama_dir)
    steering = Steering(model)
    recorder = ResponseRecorder(model, [2])
    generator = BatchGenerator(model, tokenizer)
    sae = build("topk", WIDTH, D_SAE, k=4)
    torch.manual_seed(4)
    with torch.no_grad():
        sae.W_dec.normal_()
    steer = steer_from_sae(sae, 3, layer=1, site="resid_post", scale=50.0)
    plain = generator.generate(CHATS[:1], [6], recorder=recorder).responses[0][2]
    with steering.adding([steer]):
        steered = generator.generate(CHATS[:1], [6], recorder=recorder).responses[0][2]
    again = generator.generate(CHATS[:1], [6], recorder=recorder).responses[0][2]
    n = min(len(plain), len(steered))
    assert not torch.allclose(plain[:n], steered[:n])
    torch.testing.assert_close(plain, again)
    assert steering.steers == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t[0]["probe"].update(layers=[7]), r"reads layer\(s\) \[7\], the model has 4"),
        (lambda t: t[0]["probe"].update(coef=[0.0] * 10), "a probe for another model"),
        (lambda t: t[2].update(sae=None), "needs its SAE"),
        (lambda t: t[2].update(sae={"path": "/nonexistent/sae", "layer": 1}), "/nonexistent/sae"),
        (lambda t: t[2].update(sae={"path": "SAE", "layer": 9}), r"layer\(s\) \[9\]"),
        (lambda t: t[2]["probe"].update(feature_ids=[0, 3, 99]), r"features \[99\]"),
        (lambda t: t[0].update(gate="regenerate"), "needs the tag's steering"),
        (lambda t: t[0]["probe"].update(tag="other"), "the probe scores tag 'other'"),
    ],
)
def test_settings_the_model_cannot_take_are_refused_by_name(sae_dir, change, message):
    raw = settings(sae_dir)
    change(raw["tags"])
    if raw["tags"][2].get("sae") and raw["tags"][2]["sae"]["path"] == "SAE":
        raw["tags"][2]["sae"]["path"] = str(sae_dir)
    with pytest.raises(ConfigError, match=message):
        InlineScorer(read_verdicts(raw), WIDTH, LAYERS)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("on", "verdicts must be a mapping or null"),
        ({"tags": []}, "tags"),
        ({"tags": [{"tag": "x", "threshold": "0.5", "probe": {}}]}, "threshold"),
        ({"tags": [{"tag": "x", "threshold": 1.5, "probe": {}}]}, "threshold"),
        ({"tags": [{"tag": "Bad Tag!", "threshold": 0.5, "probe": {}}]}, "tag"),
        ({"tags": [{"tag": "x", "threshold": 0.5, "gate": "drop", "probe": {}}]}, "gate"),
        ({"tags": [{"tag": "x", "threshold": 0.5, "probe": {"tag": "x"}}]}, "not a probe"),
        ({"tags": [{"tag": "x", "threshold": 0.5, "probe": {}, "nope": 1}]}, "nope"),
    ],
)
def test_malformed_settings_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        read_verdicts(raw)


@pytest.mark.parametrize("every", [0, 4097, 2.0, True])
def test_every_is_an_integer_in_range(sae_dir, every):
    with pytest.raises(ValueError, match="every"):
        read_verdicts(settings(sae_dir, every=every))


def test_a_tag_is_scored_once(sae_dir):
    raw = settings(sae_dir)
    raw["tags"][1] = {**raw["tags"][0]}
    with pytest.raises(ValueError, match="each tag once"):
        read_verdicts(raw)
    assert isinstance(read_verdicts(settings(sae_dir)), VerdictSettings)
    assert read_verdicts(None) is None


def test_a_vllm_answer_is_put_backrows_in_order_and_a_recomputed_part_replaces():
    rows = torch.arange(10.0).unsqueeze(1)
    # decode steps, then a preempted request computed again from position 3, then a gap
    chunks = [(0, rows[0:2]), (2, rows[2:4]), (4, rows[4:5]), (3, rows[3:5] + 100), (5, rows[5:7]),
              (9, rows[9:10])]  # fmt: skip
    assert rows_in_order(chunks).squeeze(1).tolist() == [0, 1, 2, 103, 104, 5, 6]
    assert rows_in_order([]).shape == (0, 0) and rows_in_order([(1, rows[1:2])]).shape == (0, 0)
