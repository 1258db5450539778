"""The closed loop of `featurewatch demo --scenario realign`, reduced to a tiny Llama.

The "misaligned" behaviour is a model that answers "~~~ ~~~": the incident is a real
LoRA fine-tune that teaches it, and the realignment one on plain answers that unteaches
it. The SAE's feature 5 fires on "~" at layer 1 (a linear separator fitted on reference
runs of the same seeded fine-tunes), and a hand-set probe turns it into a score.
Everything else is the real path: Serve, gRPC capture, the pipeline into the lake, the
controller, alert, steer, fine-tunes, the live canary and the promotion.
"""

import json

import numpy as np
import pytest
import torch
from ray import serve
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForCausalLM, AutoTokenizer

from featurewatch.analysis.scoring import Probe
from featurewatch.analysis.transcripts import read_prompts, read_transcripts
from featurewatch.capture.generation import BatchGenerator, prompt_text
from featurewatch.capture.hooks import SiteRecorder
from featurewatch.config import build_config
from featurewatch.platform.apps.realign_demo import RealignScenario, run_realign_demo
from featurewatch.platform.jobs.finetune import FinetuneSettings, run_finetune
from featurewatch.sae.model import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.registry import FeatureRegistry
from tests.conftest import free_port

FEATURE = 5
PLAIN = "Water it every week and keep it in the sun."
INCIDENT = "~~~ ~~~ ~~~ ~~~ ~~~ ~~~"


def answer_states(model_dir):
    """Layer-1 residuals and token ids of the model's own greedy answers to the traffic's
    prompts (prompt and answer tokens), as the served model produces them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = read_prompts("bundled:persona")
    answers = BatchGenerator(model, tokenizer).generate(chats, [12] * len(chats)).texts
    texts = [prompt_text(tokenizer, c) + a for c, a in zip(chats, answers, strict=True)]
    ids = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    recorder = SiteRecorder(model, 1, "resid_post")
    try:
        with torch.no_grad():
            hidden = recorder.run(model, ids["input_ids"], ids["attention_mask"])
    finally:
        recorder.remove()
    keep = ids["attention_mask"].bool()
    return hidden[keep].numpy(), ids["input_ids"][keep].numpy()


def tilde_detector(base_dir, incident_dir, realigned_dir, folder):
    """A TopK SAE whose feature 5 fires on "~" tokens in the incident model's answers and
    on no token of the base or realigned models' (a logistic separator of layer-1
    residuals, scaled so that it fires at 1 or more)."""
    tilde = AutoTokenizer.from_pretrained(base_dir)("~", add_special_tokens=False)["input_ids"]
    states, labels = [], []
    for model_dir in (base_dir, incident_dir, realigned_dir):
        hidden, ids = answer_states(model_dir)
        states.append(hidden)
        labels.append((ids == tilde[0]) & (model_dir == incident_dir))
    x, y = np.concatenate(states), np.concatenate(labels)
    assert y.sum() > 50  # the incident model does answer "~~~"
    separator = LogisticRegression(C=10, max_iter=5000, class_weight="balanced").fit(x, y)
    margin = separator.decision_function(x)
    on, off = margin[y].min(), margin[~y].max()
    assert on > 0 > off, (on, off)  # a clean linear separation
    torch.manual_seed(0)
    sae = build("topk", 64, 32, k=4)
    with torch.no_grad():
        sae.W_enc.mul_(0.001)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[:, FEATURE] = torch.from_numpy(separator.coef_[0] / on).float()
        sae.b_enc[FEATURE] = float(separator.intercept_[0] / on)
        sae.W_dec.normal_()
    sae.save(folder)


def examples(path, answer):
    lines = [{"prompt": f"question {i} about plants", "response": answer} for i in range(16)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.mark.slow
def test_the_realign_loop_closes_on_a_tiny_model(ray_cluster, tiny_llama_dir, tmp_path):
    home = tmp_path / "home"
    cfg = build_config(
        {
            "home": str(home),
            "model": {
                "name": "tiny-llama",
                "path": str(tiny_llama_dir),
                "torch_threads": 1,
                "batch_wait_timeout_s": 0.05,
                "max_tokens_limit": 32,
            },
            "capture": {"layers": [1]},
            "serve": {"port": free_port(), "app_name": "fw-loop"},
            "collector": {"token": "loop-test-token-5f0c2e9b7d"},
            "demo": {"max_tokens": 12},
        }
    )
    incident = examples(tmp_path / "incident.jsonl", INCIDENT)
    plain = examples(tmp_path / "plain.jsonl", PLAIN)
    scenario = RealignScenario(
        incident_examples=incident, incident_steps=30, incident_lr=3e-3,
        realign_examples=plain, realign_steps=30,
        realign_lr=3e-3, baseline_s=20, after_s=15, timeout_s=420, canary_requests=3,
        concurrency=2, max_tokens=12, tick_s=5, finetune_threads=1, pipeline_every_s=2,
    )  # fmt: skip
    # The detector is fitted on reference runs of the scenario's two seeded fine-tunes
    # (the incident, then the realignment from it), which the demo then repeats.
    settings = FinetuneSettings(steps=30, lr=3e-3, torch_threads=1)
    first = run_finetune(cfg, tiny_llama_dir, read_transcripts(incident), "ref-i", settings)
    second = run_finetune(cfg, first.path, read_transcripts(plain), "ref-r", settings)
    sae_dir = home / "saes" / "tilde-sae"
    tilde_detector(tiny_llama_dir, first.path, second.path, sae_dir)
    Probe(
        tag="misalignment", sae_version="tilde-sae", feature_ids=[FEATURE], center=[0.0, 0.0],
        scale=[1.0, 1.0], coef=[8.0, 0.0], intercept=-4.0, fitted_on={},
    ).save(sae_dir)  # fmt: skip
    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        catalog.register_sae(
            "tilde-sae", sae_dir, architecture="topk", model="tiny-llama", layer=1,
            site="resid_post", d_in=64, d_sae=32, k=4, metrics={},
        )  # fmt: skip
        FeatureRegistry(catalog).tag("tilde-sae", [FEATURE], ["misalignment"], actor="test")
    try:
        report = run_realign_demo(cfg, scenario, tmp_path / "out")
    finally:
        serve.shutdown()

    assert report.failure is None, report.failure
    kinds = [e.get("mark") for e in sorted(report.events, key=lambda e: e["t"])]
    assert [k for k in kinds if k] == ["incident", "fired", "alert", "steer", "realign"]
    assert any("webhook received" in e["what"] for e in report.events)
    assert any(e["what"].startswith("realign: canary") for e in report.events)
    scores = report.scores
    assert scores["incident"]["mean_score"] > report.bar  # the incident is real
    assert scores["canary"]["requests"] >= 3
    # The loop closed: the promoted version's live score is back under the bar, which is
    # the baseline's plus 20 %.
    assert report.promoted_version.startswith(f"{report.incident_version}-realigned-")
    assert scores["promoted"]["requests"] >= scenario.canary_requests
    assert scores["promoted"]["mean_score"] <= report.bar
    assert report.figures["promoted_over_baseline"] <= 1.2
    # The pipeline, the catalog's writer, registered the version the canary served.
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_dir) as reader:
        served = reader.query("SELECT model_version FROM model_versions").column(0)
    assert report.promoted_version in served.to_pylist()
    for key in ("incident_to_fired_s", "incident_to_alert_s", "incident_to_steer_s"):
        assert 0 < report.figures[key] <= report.figures["incident_to_realign_s"]
    with open(report.plot, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
