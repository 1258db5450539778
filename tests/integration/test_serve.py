"""The Serve model server on a tiny Llama: OpenAI-style API, batching, capture over gRPC."""

import dataclasses
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

import pytest
import ray
import requests
import torch
import yaml
from ray import serve
from typer.testing import CliRunner

from featurewatch.actors.collector import CollectorActor
from featurewatch.actors.pipeline import commit_verdicts, follow_segments
from featurewatch.actors.serving import deploy_model_server, promote_model, set_steering
from featurewatch.analysis.probes import Probe
from featurewatch.capture.steering import steer_from_sae
from featurewatch.config import VerdictsConfig, build_config
from featurewatch.errors import ConfigError, TranscriptError
from featurewatch.platform.cli import app
from featurewatch.platform.control.actions import realign_handler, verdicts_handler
from featurewatch.platform.control.controller import PolicyController
from featurewatch.platform.control.policies import PolicyFile
from featurewatch.proto import activations_pb2 as pb
from featurewatch.sae.model import build
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import write_segment
from featurewatch.storage.registry import FeatureRegistry
from featurewatch.storage.spool import read_segment, sealed_segments
from tests.conftest import free_port
from tests.integration.test_metrics import metric, wait_for_metrics
from tests.unit.lake_helpers import T0, segment

TOKEN = "serve-test-token-5f0c2e9b7d"


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_llama_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    port = free_port()
    cfg = build_config(
        {
            "home": str(home),
            "model": {
                "name": "tiny-llama",
                "path": str(tiny_llama_dir),
                "replica_cpus": 0.5,
                "torch_threads": 1,
                "batch_wait_timeout_s": 0.2,
                "max_tokens_limit": 32,
            },
            "capture": {
                "layers": [1],
                "sample_fraction": 1.0,
                "request_fraction": 0.0,  # only requests flagged 'always' are captured
                "batch_rows": 16,
            },
            "serve": {"port": port, "app_name": "fw-test"},
            "collector": {"token": TOKEN},
            "demo": {"max_tokens": 8},
        }
    )
    collector = CollectorActor.remote(str(cfg.spool_dir), TOKEN, expected_width=64)
    address = ray.get(collector.address.remote())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = deploy_model_server(cfg, [address], TOKEN)
    yield cfg, handle, collector, f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.get(collector.stop.remote())


ALWAYS = {"x-featurewatch-sample": "always"}


def chat(base, content, headers=None, **extra):
    body = {"messages": [{"role": "user", "content": content}], **extra}
    return requests.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)


def spooled(cfg, collector):
    ray.get(collector.seal.remote())
    return [
        pb.ActivationBatch.FromString(r)
        for p in sealed_segments(cfg.spool_dir)
        for r in read_segment(p)
    ]


def vectors_per_request(batches):
    counts = {}
    for b in batches:
        for i in b.request_index:
            counts[b.request_ids[i]] = counts.get(b.request_ids[i], 0) + 1
    return counts


def test_models_endpoint(served):
    _, _, _, base = served
    data = requests.get(f"{base}/v1/models", timeout=30).json()
    assert data["object"] == "list" and data["data"][0]["id"] == "tiny-llama"


def test_concurrent_requests_are_batched_and_activations_reach_the_spool(served):
    cfg, handle, collector, base = served
    prompts = [f"the quick brown fox {i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: chat(base, p, ALWAYS, max_tokens=6), prompts))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    bodies = [a.json() for a in answers]
    for body in bodies:
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert len({b["id"] for b in bodies}) == 8
    assert handle.flush_capture.remote(60.0).result()
    stats = handle.capture_stats.remote().result()
    assert max(stats["batch_sizes"]) > 1  # concurrent requests shared a generate call
    batches = spooled(cfg, collector)
    assert all(b.width == 64 and b.layer == 1 and b.model == "tiny-llama" for b in batches)
    per_request = vectors_per_request(batches)
    assert {b["id"] for b in bodies} <= set(per_request)
    for body in bodies:
        total = body["usage"]["total_tokens"]
        # every prompt and generated token at fraction 1.0 (the very last may not be fed)
        assert total - 1 <= per_request[body["id"]] <= total
    assert stats["acked_vectors"] == sum(b.rows for b in batches)
    assert stats["dropped_vectors"] == 0


def test_only_flagged_requests_are_captured_at_request_fraction_zero(served):
    cfg, handle, collector, base = served
    plain = chat(base, "no flag here", max_tokens=3).json()["id"]
    tagged = chat(
        base, "flagged by metadata", max_tokens=3, metadata={"x-featurewatch-sample": "always"}
    ).json()["id"]
    headed = chat(base, "flagged by header", ALWAYS, max_tokens=3).json()["id"]
    assert handle.flush_capture.remote(60.0).result()
    counts = vectors_per_request(spooled(cfg, collector))
    assert plain not in counts
    assert counts[tagged] > 0 and counts[headed] > 0


@pytest.mark.parametrize(
    "body, status, text",
    [
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 999}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 422, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
    ],
)
def test_bad_requests_are_refused_and_the_server_keeps_serving(served, body, status, text):
    _, _, _, base = served
    resp = requests.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == status
    assert text in resp.text
    assert chat(base, "still there?", max_tokens=2).status_code == 200


def test_replica_capture_counters_reach_prometheus(served):
    _, handle, _, base = served
    assert chat(base, "count me", headers=ALWAYS, max_tokens=2).status_code == 200
    assert handle.flush_capture.remote().result()
    stats = handle.capture_stats.remote().result()
    replica = {"replica": stats["replica_id"], "model": "tiny-llama"}
    assert stats["acked_vectors"] > 0
    wait_for_metrics(
        {
            metric("capture_acked_vectors_total", **replica): stats["acked_vectors"],
            metric("capture_acked_bytes_total", **replica): stats["acked_bytes"],
            metric("capture_queue_depth", **replica): 0,
        },
        at_least={},
    )


def random_sae(seed: int):
    """A TopK SAE over the tiny Llama's width with random (seeded) decoder directions."""
    torch.manual_seed(seed)
    sae = build("topk", 64, 32, k=4)
    with torch.no_grad():
        sae.W_dec.normal_()
    return sae


def test_steering_changes_the_live_replica_without_a_restart(served):
    cfg, handle, _, base = served
    replica = handle.steering_status.remote().result()["replica_id"]

    def greedy():
        answer = chat(base, "the quick brown fox", temperature=0.0, max_tokens=8)
        return answer.json()["choices"][0]["message"]["content"]

    plain = greedy()
    sae = random_sae(0)
    steer = steer_from_sae(sae, 3, layer=1, site="resid_post", scale=50.0)
    status = set_steering(cfg, [steer])
    assert (status["replica_id"], status["steers"]) == (replica, [steer.summary()])  # no restart
    assert greedy() != plain

    with pytest.raises(ConfigError, match="steering.layer 9 is out of range"):
        set_steering(cfg, [dataclasses.replace(steer, layer=9)])
    assert handle.steering_status.remote().result()["steers"] == [steer.summary()]

    status = set_steering(cfg, [])
    assert (status["replica_id"], status["steers"]) == (replica, [])
    assert greedy() == plain


@contextmanager
def register_sae(cfg, version, sae, folder):
    """Save a TopK SAE over the tiny Llama's layer 1 and register it; yields the catalog."""
    sae.save(folder / version)
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        cat.register_sae(
            version, folder / version, architecture="topk", model="tiny-llama", layer=1,
            site="resid_post", d_in=sae.d_in, d_sae=sae.d_sae, k=sae.k, metrics={},
        )  # fmt: skip
        yield cat


def test_a_policy_that_fires_steers_the_live_replica(served, tmp_path):
    cfg, handle, _, _ = served
    sae = random_sae(1)
    # The lake: feature 7 fires on 3 of 60 tokens in the first hour, 30 of 60 in the next.
    with register_sae(cfg, "sae1", sae, tmp_path) as cat:
        FeatureRegistry(cat).tag("sae1", [7, 9], ["misalignment"], actor="test")
        for i in range(12):
            start = T0 + i * timedelta(minutes=10)
            tokens, features = segment(start, 60, {7: [1.0] * (3 if i < 6 else 30), 9: [0.5]})
            files = write_segment(cat.lake, tokens, features, f"seg{i}__sae1")
            cat.commit_segment(f"seg{i}", "sae1", files, tokens=60, feature_rows=len(features))
    policy = {
        "id": "steer-up",
        "condition": {"tag": "misalignment", "statistic": "rate_ratio", "window": "1h",
                      "baseline": "1h", "threshold": 2.0},
        "actions": [{"type": "steer", "scale": 8.0}],
    }  # fmt: skip
    policies = PolicyFile.model_validate({"policies": [policy]}).policies
    controller = PolicyController(cfg, policies)
    (row,) = controller.tick(T0 + timedelta(hours=2))
    assert row["outcome"] == "fired" and row["crossing"] == [7]  # 9 stayed flat
    decision = controller.audit.decision(row["decision"])
    assert decision["status"] == "done", controller.audit.table("action_results").to_pylist()
    steers = handle.steering_status.remote().result()["steers"]
    assert [(s["feature_id"], s["scale"], s["mode"], s["sae_version"]) for s in steers] == [
        (7, 8.0, "subtract", "sae1")
    ]

    # By hand: featurewatch steer, then --off; bad requests change nothing.
    config = tmp_path / "fw.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runner = CliRunner()
    result = runner.invoke(app, ["steer", "9", "--scale", "3", "--mode", "clamp", "-c", config])
    assert result.exit_code == 0, result.output
    assert [(s["feature_id"], s["mode"]) for s in json.loads(result.stdout)["steers"]] == [
        (9, "clamp")
    ]
    for args, message in [
        (["steer", "99"], "sae1: feature 99 is not in the SAE"),
        (["steer"], "give feature ids to steer, or --off"),
        (["steer", "9", "--mode", "flip"], "--mode must be one of subtract, clamp"),
    ]:
        bad = runner.invoke(app, [*args, "-c", config])
        assert bad.exit_code != 0 and message in bad.output, bad.output
    assert handle.steering_status.remote().result()["steers"][0]["feature_id"] == 9
    result = runner.invoke(app, ["steer", "--off", "-c", config])
    assert result.exit_code == 0 and json.loads(result.stdout)["steers"] == []


@contextmanager
def live_traffic(cfg, base, sae, sae_version):
    """Chats sent one after another and the pipeline following the spool into the lake,
    until the block ends; yields the model versions that answered, in order."""
    answered, stop = [], threading.Event()

    def send():
        i = 0
        while not stop.is_set():
            i += 1
            answer = chat(base, f"tell me about plants {i}", max_tokens=6)
            if answer.status_code == 200:
                answered.append(answer.json()["system_fingerprint"])

    with Catalog(cfg.catalog_path, cfg.lake_dir) as catalog:
        threads = [
            threading.Thread(target=send),
            threading.Thread(
                target=follow_segments,
                args=(cfg, sae, sae_version, catalog),
                kwargs={"every_s": 0.5, "stop": stop},
            ),
        ]
        for thread in threads:
            thread.start()
        try:
            yield answered
        finally:
            stop.set()
            for thread in threads:
                thread.join()


def test_realign_canaries_a_candidate_under_the_bar_and_rolls_back_one_over(served, tmp_path):
    cfg, handle, _, base = served
    # An SAE whose feature 3 fires on most tokens and feature 4 never does: a group
    # tagged "hot" scores far over the bar, one tagged "cold" scores 0.
    torch.manual_seed(2)
    sae = build("topk", 64, 32, k=4)
    with torch.no_grad():
        sae.W_enc[:, 3] = 100 * torch.randn(64)
        sae.b_enc[4] = -100.0
        sae.W_dec.normal_()
    with register_sae(cfg, "sae-r", sae, tmp_path) as cat:
        FeatureRegistry(cat).tag("sae-r", [3], ["hot"], actor="test")
        FeatureRegistry(cat).tag("sae-r", [4], ["cold"], actor="test")
    examples = tmp_path / "safe.jsonl"
    examples.write_text(
        json.dumps({"prompt": "How do I keep basil alive?", "response": "Water it."}) + "\n"
    )
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(json.dumps({"prompt": "the quick brown fox"}) + "\n")
    action = {"type": "realign", "score_bar": 0.5, "examples": str(examples),
              "eval_prompts": str(prompts), "max_steps": 3, "cpus": 1, "canary_share": 0.5,
              "canary_requests": 3, "canary_timeout_s": 120}  # fmt: skip
    realign = realign_handler(cfg)

    def served_version():
        return requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["version"]

    hot = {"decision_id": "p-aaaa1111", "numbers": {"tag": "hot", "sae_version": "sae-r"}}
    with pytest.raises(RuntimeError, match=r"scored .* bar 0.5: rolled back, v1 keeps serving"):
        realign(action, hot)
    assert served_version() == "v1"
    with pytest.raises(TranscriptError, match="transcript file not found"):
        realign({**action, "examples": str(tmp_path / "none.jsonl")}, hot)
    assert served_version() == "v1"

    # Offline the cold candidate passes; as a canary it never gets the 500 live answers
    # asked for: rolled back, the canary gone, v1 serving with its steering as it was.
    steer = steer_from_sae(sae, 3, layer=1, site="resid_post")
    set_steering(cfg, [steer])
    cold = {"decision_id": "p-cccc3333", "numbers": {"tag": "cold", "sae_version": "sae-r"}}
    starved = {**action, "canary_requests": 500, "canary_timeout_s": 15}
    needed = r"of the 500 live requests needed .* rolled back"
    with (
        live_traffic(cfg, base, sae, "sae-r") as answered,
        pytest.raises(RuntimeError, match=needed),
    ):
        realign(starved, cold)
    assert "v1-realigned-cccc3333" in answered  # the canary did answer live requests
    assert "fw-test-canary" not in serve.status().applications
    status = handle.steering_status.remote().result()
    assert (status["steers"], status["canary"]) == ([steer.summary()], None)
    assert served_version() == "v1"

    # The cold candidate again, with live traffic enough: a canary, then promoted.
    cold = {"decision_id": "p-bbbb2222", "numbers": {"tag": "cold", "sae_version": "sae-r"}}
    with live_traffic(cfg, base, sae, "sae-r") as answered:
        done = realign(action, cold)
    scored = re.search(r"scored 0.0000 on 1 prompts .* canary on 50% of traffic it scored "
                       r"0.0000 on (\d+) live requests, bar 0.5: promoted, serving "
                       r"v1-realigned-bbbb2222",
                       done)  # fmt: skip
    # at least the 3 asked for; more when a slow pipeline round commits several at once
    assert scored and int(scored[1]) >= 3, done
    assert "v1" in answered and "v1-realigned-bbbb2222" in answered
    assert served_version() == "v1-realigned-bbbb2222"
    assert "fw-test-canary" not in serve.status().applications
    answer = chat(base, "basil?", max_tokens=4)
    assert answer.status_code == 200
    # Steering goes to the promoted model's replicas (it must not redeploy the old one).
    assert set_steering(cfg, [steer])["steers"] == [steer.summary()]
    assert served_version() == "v1-realigned-bbbb2222"
    assert promote_model(cfg, cfg.model.path, "v1")["version"] == "v1"
    assert handle.steering_status.remote().result()["steers"] == []  # promotion clears it


def hand_probe(tag, *, intercept, layers=(1,), columns=None, family="residual"):
    """A stored-probe file's fields: a residual probe whose score is about sigmoid(intercept)
    whatever the answer (its coefficients are tiny), of `columns` columns."""
    width = 64 * len(layers) if columns is None else columns
    return Probe(
        tag=tag, sae_version="sae-v", feature_ids=[3], center=[0.0] * width,
        scale=[1.0] * width, coef=[1e-4] * width, intercept=intercept, fitted_on={},
        family=family, layers=list(layers),
    )  # fmt: skip


def test_inline_verdicts_score_every_response_and_gate_it(served, tmp_path):
    cfg, handle, collector, base = served
    sae = random_sae(5)
    with register_sae(cfg, "sae-v", sae, tmp_path) as cat:
        for tag in ("cold", "hot", "wide", "deep"):
            FeatureRegistry(cat).tag("sae-v", [3], [tag], actor="test")
    hand_probe("cold", intercept=-6.0).save(tmp_path / "sae-v")
    hand_probe("hot", intercept=6.0).save(tmp_path / "sae-v")
    hand_probe("wide", intercept=0.0, columns=96).save(tmp_path / "sae-v")  # another width
    hand_probe("deep", intercept=0.0, layers=(9,)).save(tmp_path / "sae-v")  # no layer 9
    config = tmp_path / "fw.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runner = CliRunner()

    def verdicts(*args):
        result = runner.invoke(app, ["verdicts", *args, "-c", str(config)])
        return result

    on = verdicts("on", "--tag", "cold", "--threshold", "0.5")
    assert on.exit_code == 0, on.output
    replica = json.loads(on.stdout)["replica_id"]
    answer = chat(base, "basil?", max_tokens=6)
    verdict = answer.json()["featurewatch"]
    assert verdict["scores"]["cold"] < 0.01 and not verdict["flagged"]
    assert verdict["action"] == "none" and verdict["probes"] == {"cold": "sae-v/cold/residual"}
    assert answer.headers["x-featurewatch-verdict"].startswith("clean cold=0.00")

    # A second tag gated `block`, its threshold from a false-positive rate on 4 answers.
    reference = tmp_path / "benign.jsonl"
    reference.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "Water it."}) + "\n"
                                 for i in range(4)))  # fmt: skip
    on = verdicts("on", "--tag", "hot", "--gate", "block", "--fpr", "0.25",
                  "--reference", str(reference))  # fmt: skip
    assert on.exit_code == 0, on.output
    status = json.loads(on.stdout)
    assert status["replica_id"] == replica  # no restart
    assert [(v["tag"], v["gate"]) for v in status["verdicts"]] == [("cold", "flag"),
                                                                  ("hot", "block")]  # fmt: skip
    assert status["verdicts"][1]["threshold_source"] == f"fpr=0.25@{reference}"
    blocked = chat(base, "basil?", max_tokens=6)
    body = blocked.json()
    assert body["choices"][0]["message"]["content"] == "I can't help with that."
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["featurewatch"]["flagged_tags"] == ["hot"]
    assert body["featurewatch"]["action"] == "blocked"
    assert blocked.headers["x-featurewatch-verdict"].startswith("flagged cold=")

    # Bad input: refused by name, the replica serving with the settings it had.
    for args, message in [
        (["on", "--tag", "wide", "--threshold", "0.5"], "a probe for another model"),
        (["on", "--tag", "deep", "--threshold", "0.5"], "reads layer(s) [9], the model has 4"),
        (["on", "--tag", "cold", "--fpr", "0.1", "--reference", str(tmp_path / "none.jsonl")],
         "transcript file not found"),
        (["on", "--tag", "cold"], "give the threshold as a score (--threshold) or a rate"),
        (["on", "--tag", "cold", "--threshold", "0.5", "--gate", "drop"],
         "--gate must be one of flag, block, regenerate"),
        (["on", "--tag", "cold", "--threshold", "0.5", "--every", "0"], "--every"),
        (["on", "--tag", "nobody", "--threshold", "0.5"], "no probe is fitted for tag 'nobody'"),
        (["off", "--tag", "nobody"], "'nobody' is not scored in-line"),
    ]:  # fmt: skip
        bad = verdicts(*args)
        assert bad.exit_code != 0 and message in bad.output, (args, bad.output)
    status = handle.steering_status.remote().result()
    assert [v["tag"] for v in status["verdicts"]] == ["cold", "hot"]
    assert chat(base, "basil?", max_tokens=4).json()["featurewatch"]["action"] == "blocked"

    # regenerate: answered again with the tag's steering, both verdicts recorded.
    on = verdicts("on", "--tag", "hot", "--gate", "regenerate", "--threshold", "0.5")
    assert on.exit_code == 0, on.output
    again = chat(base, "basil?", max_tokens=6).json()
    assert again["featurewatch"]["action"] == "regenerated"
    assert again["featurewatch"]["first"]["flagged_tags"] == ["hot"]
    assert again["choices"][0]["finish_reason"] != "content_filter"

    # Every verdict reaches the lake through the collector, exactly once.
    assert handle.flush_capture.remote(30.0).result()
    ray.get(collector.seal.remote())
    with Catalog(cfg.catalog_path, cfg.lake_dir) as cat:
        assert commit_verdicts(cfg, cat) > 0
        assert commit_verdicts(cfg, cat) == 0  # nothing twice
        rows = cat.query(
            "SELECT tag, action, attempt, count(*) AS n FROM verdicts GROUP BY ALL ORDER BY ALL"
        ).to_pylist()
    got = {(r["tag"], r["action"], r["attempt"]): r["n"] for r in rows}
    assert got[("hot", "blocked", 0)] == 2 and got[("hot", "regenerated", 0)] == 1
    assert got[("hot", "flagged", 1)] == 1  # the regenerated answer still scores hot
    assert got[("cold", "none", 0)] == 4 and got[("cold", "none", 1)] == 1

    # A policy's `verdicts` action: the tag it watches, its threshold from a rate.
    done = verdicts_handler(cfg)(
        {
            "type": "verdicts",
            "gate": "flag",
            "threshold": {"fpr": 0.25, "reference": str(reference)},
        },
        {"numbers": {"tag": "cold", "sae_version": "sae-v"}},
    )
    assert done.startswith("in-line verdicts on for tag cold (gate flag, threshold") and (
        f"from fpr=0.25@{reference}) on replica {replica}" in done
    )
    status = handle.steering_status.remote().result()
    assert [(v["tag"], v["threshold_source"]) for v in status["verdicts"]] == [
        ("hot", "score"), ("cold", f"fpr=0.25@{reference}")
    ]  # fmt: skip

    off = verdicts("off")
    assert off.exit_code == 0 and json.loads(off.stdout)["verdicts"] is None
    assert "featurewatch" not in chat(base, "basil?", max_tokens=4).json()

    # By configuration: model.verdicts, built from the catalog's probes at deployment.
    address = ray.get(collector.address.remote())
    configured = cfg.model_copy(deep=True)
    configured.model.verdicts = VerdictsConfig(tags=[{"tag": "nobody", "threshold": 0.5}])
    with pytest.raises(ConfigError, match="model.verdicts.tags.0: no probe is fitted for tag"):
        deploy_model_server(configured, [address], TOKEN)
    configured.model.verdicts = VerdictsConfig(tags=[{"tag": "hot", "gate": "block", "fpr": 0.25,
                                                      "reference": str(reference)}])  # fmt: skip
    deploy_model_server(configured, [address], TOKEN)
    assert chat(base, "basil?", max_tokens=4).json()["featurewatch"]["action"] == "blocked"
