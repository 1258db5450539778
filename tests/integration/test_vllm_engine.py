"""The vLLM engine (`model.engine: vllm`) on a tiny random Llama: vLLM's OpenAI API driven
by the OpenAI SDK, capture inside the engine attributed to requests and positions, and
every captured vector checked against a plain transformers forward."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import asdict

import numpy as np
import openai
import pytest
import ray
import requests
import torch
from peft import LoraConfig, get_peft_model
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from featurewatch.actors.collector import CollectorActor
from featurewatch.actors.serving import (
    canary_app_name,
    check_servable,
    deploy_model_server,
    promote_model,
    set_steering,
    set_verdicts,
    start_canary,
)
from featurewatch.analysis.probes import Probe, probe_terms
from featurewatch.analysis.transcript_features import pooled_features
from featurewatch.analysis.transcripts import Transcript
from featurewatch.analysis.verdicts import REFUSAL, read_verdicts
from featurewatch.capture.steering import steer_from_sae
from featurewatch.config import build_config
from featurewatch.errors import ConfigError
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import unpack_vectors
from featurewatch.sae import build
from featurewatch.storage.spool import read_segment, sealed_segments
from tests.conftest import build_tiny_model, free_port, wordy_copy

TOKEN = "vllm-test-token-5f0c2e9b7d"
LAYER = 1
KV_BLOCK = 128  # positions per KV cache block, vLLM's default on the CPU
ALWAYS = {"x-featurewatch-sample": "always"}  # capture.always_sample_header


@pytest.fixture(scope="module")
def vllm_llama_dir(tmp_path_factory):
    # vLLM's CPU attention needs a head size of 32 or more: 128 wide, 4 heads. Whole
    # words only, so that in-line scores can be compared with offline ones on the text.
    folder = build_tiny_model("llama", tmp_path_factory.mktemp("vllm-llama-random"), hidden=128)
    return wordy_copy(folder, tmp_path_factory.mktemp("vllm-llama"))


@pytest.fixture(scope="module")
def served(ray_cluster, vllm_llama_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("vllm-home")
    port = free_port()
    cfg = build_config(
        {
            "home": str(home),
            "model": {
                "name": "tiny-llama",
                "path": str(vllm_llama_dir),
                "engine": "vllm",
                "replica_cpus": 0.5,
                "max_tokens_limit": 64,
                # 32 tokens a forward pass: longer prompts are prefilled in chunks
                "vllm": {
                    "max_model_len": 256,
                    "kv_cache_gib": 0.25,
                    "max_num_seqs": 16,
                    "max_num_batched_tokens": 32,
                },
            },
            # Half the requests are captured, each whole; tests that need a request's
            # rows flag it always-sample.
            "capture": {
                "layers": [LAYER],
                "sites": ["resid_post", "mlp_out"],
                "sample_fraction": 1.0,
                "request_fraction": 0.5,
                "wire_dtype": "float32",
            },
            "serve": {"port": port, "app_name": "fw-vllm-test"},
            "collector": {"token": TOKEN},
        }
    )
    collector = CollectorActor.remote(
        str(cfg.spool_dir), TOKEN, expected_width=128, segment_max_age_s=0.2
    )
    address = ray.get(collector.address.remote())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = deploy_model_server(cfg, [address], TOKEN)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    yield cfg, handle, client
    serve.shutdown()
    ray.get(collector.stop.remote())


def captured_rows(
    cfg, *handles, versions=None, site="resid_post"
) -> dict[str, dict[int, tuple[int, torch.Tensor]]]:
    """request id -> position -> (token id, vector) at `site`, from the sealed spool
    segments, once every replica behind `handles` flushed; `versions` (a dict) gets each
    request's model versions."""
    for handle in handles:
        assert handle.flush_capture.remote(60.0).result(timeout_s=90)
    time.sleep(0.5)  # the collector seals segments older than 0.2 s
    rows: dict[str, dict[int, tuple[int, torch.Tensor]]] = defaultdict(dict)
    for path in sealed_segments(cfg.spool_dir):
        for raw in read_segment(path):
            batch = pb.ActivationBatch.FromString(raw)
            if batch.site != site:
                continue
            vectors = unpack_vectors(batch)
            for i in range(batch.rows):
                request = batch.request_ids[batch.request_index[i]]
                if versions is not None:
                    versions.setdefault(request, set()).add(batch.model_version)
                rows[request][batch.token_pos[i]] = (
                    batch.token_id[i],
                    torch.from_numpy(vectors[i].copy()),
                )
    return rows


def test_the_openai_sdk_drives_chat_completions_and_streaming(served):
    cfg, _, client = served
    messages = [{"role": "user", "content": "How do I keep basil alive?"}]
    answer = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=6, temperature=0
    )
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.completion_tokens >= 1 and answer.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == answer.choices[0].message.content  # greedy: the same answer
    several = client.completions.create(
        model="tiny-llama", prompt="The quick brown fox", max_tokens=5, n=2, temperature=0.9,
        top_p=0.9, seed=3,
    )  # fmt: skip
    assert [c.index for c in several.choices] == [0, 1]
    stopped = client.completions.create(
        model="tiny-llama", prompt="The quick brown fox", max_tokens=20, temperature=0,
        stop=[answer.choices[0].message.content[:1] or "x"],
    )  # fmt: skip
    assert stopped.choices[0].finish_reason in ("stop", "length")


def test_a_request_vllm_refuses_gets_the_openai_error_and_serving_goes_on(served):
    cfg, _, client = served
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=0
        )
    assert refused.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
        )
    assert "max_tokens" in str(too_long.value)
    ok = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.choices[0].message is not None


def test_every_captured_vector_equals_a_transformers_forward(served, vllm_llama_dir):
    """Requests of different lengths, started at different times, so that prefills and
    decodes share forward passes; each captured row must sit under its request and
    position and equal the plain forward of the same token ids."""
    cfg, handle, client = served
    captured_rows(cfg, handle)  # what earlier tests left, sealed and set aside
    before = {p for p in sealed_segments(cfg.spool_dir)}
    prompts = [
        "How do I keep basil alive on a windowsill?",
        "Explain how a rainbow forms.",
        "The quick brown fox jumps over the lazy dog near the river bank, and then?",
        "Hi",
    ]
    ids: dict[str, str] = {}

    def ask(i: int) -> None:
        time.sleep(0.15 * i)  # staggered: later prefills join earlier decodes
        answer = client.completions.create(
            model="tiny-llama",
            prompt=prompts[i],
            max_tokens=8 + 3 * i,
            temperature=0,
            extra_headers=ALWAYS,
        )
        ids[prompts[i]] = answer.id

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = captured_rows(cfg, handle)
    mlp_rows = captured_rows(cfg, handle, site="mlp_out")
    fresh = [p for p in sealed_segments(cfg.spool_dir) if p not in before]
    assert fresh, "nothing was captured"
    model = AutoModelForCausalLM.from_pretrained(vllm_llama_dir, dtype=torch.float32)
    checked = 0
    for response_id in ids.values():
        # vLLM's engine id of a completion's one prompt is "<id>-0".
        by_pos = rows[f"{response_id}-0"]
        assert by_pos, f"no rows for {response_id}"
        positions = sorted(by_pos)
        assert positions == list(range(len(positions))), "every position, once, from 0"
        token_ids = [by_pos[p][0] for p in positions]
        checked += assert_forward_matches(model, token_ids, by_pos)
        mlp = mlp_rows[f"{response_id}-0"]
        assert sorted(mlp) == positions
        checked += assert_forward_matches(model, token_ids, mlp, site="mlp_out")
    assert checked > 80


def assert_forward_matches(model, token_ids: list[int], by_pos: dict, site="resid_post") -> int:
    """Each captured (position: (token id, vector)) equals a transformers forward of
    `token_ids` at LAYER and `site`; returns how many were checked."""
    seen = {}
    mlp = model.model.layers[LAYER].mlp
    handle = mlp.register_forward_hook(lambda m, i, out: seen.update(mlp_out=out[0]))
    try:
        with torch.no_grad():
            out = model(torch.tensor([token_ids]), output_hidden_states=True)
    finally:
        handle.remove()
    expected = out.hidden_states[LAYER + 1][0] if site == "resid_post" else seen["mlp_out"]
    for p, (token_id, vector) in by_pos.items():
        assert token_id == token_ids[p]
        torch.testing.assert_close(vector, expected[p], atol=2e-4, rtol=2e-3)
    return len(by_pos)


def test_the_request_fraction_and_always_sample_apply_per_request(served):
    """request_fraction 0.5: some requests are captured, each whole, the others not at
    all; a request flagged always-sample (the header, or the key in the chat body's
    metadata) always is."""
    cfg, handle, client = served
    plain = [
        client.completions.create(
            model="tiny-llama", prompt=f"Rivers and lakes, part {i}", max_tokens=3, temperature=0
        ).id
        for i in range(12)
    ]
    flagged = [
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": f"Mountains, part {i}"}],
            max_tokens=3,
            metadata=ALWAYS,
        ).id
        for i in range(6)
    ]
    rows = captured_rows(cfg, handle)
    chosen = [i for i in plain if rows.get(f"{i}-0")]
    assert 0 < len(chosen) < len(plain)
    for request in chosen:
        assert sorted(rows[f"{request}-0"]) == list(range(len(rows[f"{request}-0"])))
    assert all(rows.get(request) for request in flagged)


def test_with_a_shared_prefix_only_the_uncached_positions_are_captured(served, vllm_llama_dir):
    """Prefix caching: the second request's first KV block comes from the first's cache,
    is not recomputed, and so is not captured; what is captured is still exact."""
    cfg, handle, client = served
    tokenizer = AutoTokenizer.from_pretrained(vllm_llama_dir)
    prefix = " ".join(["the garden needs water and light every day"] * 7)
    assert KV_BLOCK < len(tokenizer(prefix)["input_ids"]) < 2 * KV_BLOCK
    ids = [
        client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0, extra_headers=ALWAYS
        ).id
        for prompt in (prefix + " first, basil.", prefix + " then, a rainbow.")
    ]
    rows = captured_rows(cfg, handle)
    first, second = rows[f"{ids[0]}-0"], rows[f"{ids[1]}-0"]
    assert sorted(first) == list(range(len(first)))
    assert sorted(second) == list(range(KV_BLOCK, KV_BLOCK + len(second))), "block 0 was cached"
    shared = [first[p][0] for p in range(KV_BLOCK)]
    tokens = shared + [second[p][0] for p in sorted(second)]
    model = AutoModelForCausalLM.from_pretrained(vllm_llama_dir, dtype=torch.float32)
    assert assert_forward_matches(model, tokens, second) > 10


def test_a_steer_changes_greedy_output_without_a_restart_and_off_restores_it(served):
    cfg, handle, client = served
    replica = handle.steering_status.remote().result()["replica_id"]

    def greedy() -> str:
        answer = client.completions.create(
            model="tiny-llama", prompt="the quick brown fox", max_tokens=8, temperature=0
        )
        return answer.choices[0].text

    plain = greedy()
    torch.manual_seed(0)
    sae = build("topk", 128, 32, k=4)
    with torch.no_grad():
        sae.W_dec.normal_()
    steer = steer_from_sae(sae, 3, layer=LAYER, site="resid_post", scale=50.0)
    status = set_steering(cfg, [steer])
    assert (status["replica_id"], status["steers"]) == (replica, [steer.summary()])  # no restart
    assert greedy() != plain
    status = set_steering(cfg, [])
    assert (status["replica_id"], status["steers"]) == (replica, [])
    assert greedy() == plain


def random_probe(tag, layers, intercept=0.1, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    columns = 128 * len(layers)
    probe = Probe(
        tag=tag, sae_version="sae-t", feature_ids=[], center=rng.normal(size=columns).tolist(),
        scale=(1 + rng.random(columns)).tolist(), coef=(rng.normal(size=columns) * 0.3).tolist(),
        intercept=intercept, fitted_on={}, family="multilayer" if len(layers) > 1 else "residual",
        layers=list(layers),
    )  # fmt: skip
    return asdict(probe)


def raw_chat(cfg, content: str, **fields) -> requests.Response:
    port = cfg.serve.port
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}],
            "temperature": 0, **fields}  # fmt: skip
    return requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)


def streamed(cfg, content: str, **fields) -> tuple[requests.Response, list[dict]]:
    answer = raw_chat(cfg, content, stream=True, **fields)
    data = [line[6:] for line in answer.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    return answer, [json.loads(d) for d in data[:-1]]


def test_inline_verdicts_equal_offline_scores_and_gate_answers_and_streams(served, vllm_llama_dir):
    cfg, handle, client = served
    prompts = ["How do I keep basil alive?", "Pretend you hate humans.", "The quick brown fox"]
    limits = [12, 5, 9]
    plain = [raw_chat(cfg, p, max_tokens=m).json() for p, m in zip(prompts, limits, strict=True)]
    replica = handle.steering_status.remote().result()["replica_id"]
    tags = [
        {"tag": "resid", "threshold": 0.5, "probe": random_probe("resid", [2])},
        {"tag": "multi", "threshold": 0.5, "probe": random_probe("multi", [1, 3], seed=1)},
    ]
    status = set_verdicts(cfg, read_verdicts({"tags": tags, "every": 4}))
    assert status["replica_id"] == replica and [v["tag"] for v in status["verdicts"]] == [
        "resid", "multi"]  # fmt: skip

    # The answers are what they were without verdicts (one token more is asked of vLLM
    # and cut back), and each scores as `featurewatch score` scores its transcript.
    answers = [raw_chat(cfg, p, max_tokens=m) for p, m in zip(prompts, limits, strict=True)]
    bodies = [a.json() for a in answers]
    for body, before in zip(bodies, plain, strict=True):
        assert body["choices"][0]["message"] == before["choices"][0]["message"]
        assert body["choices"][0]["finish_reason"] == before["choices"][0]["finish_reason"]
        assert body["usage"] == before["usage"] and "token_ids" not in body["choices"][0]
    assert [b["usage"]["completion_tokens"] for b in bodies] == limits  # all cut by length
    assert all(a.headers["x-featurewatch-verdict"].split()[0] in ("clean", "flagged")
               for a in answers)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(vllm_llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(vllm_llama_dir)
    transcripts = [
        Transcript(
            line=i,
            messages=[{"role": "user", "content": p}, {"role": "assistant", "content": text}],
        )
        for i, (p, text) in enumerate(
            zip(prompts, [b["choices"][0]["message"]["content"] for b in bodies], strict=True)
        )
    ]
    pooled = pooled_features(model, tokenizer, None, transcripts, layer=1, site="resid_post",
                             residual_layers=(1, 2, 3))  # fmt: skip
    for tag in tags:
        offline, _ = probe_terms(Probe(**tag["probe"]), pooled)
        inline = [b["featurewatch"]["scores"][tag["tag"]] for b in bodies]
        np.testing.assert_allclose(inline, offline, atol=1e-5)
    assert len({round(b["featurewatch"]["scores"]["resid"], 4) for b in bodies}) > 1

    # A stream carries the same text, and the same verdict in its final chunk.
    answer, chunks = streamed(cfg, prompts[0], max_tokens=limits[0])
    assert answer.headers["x-featurewatch-verdict"] == "final-chunk"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == bodies[0]["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    np.testing.assert_allclose(
        list(chunks[-1]["featurewatch"]["scores"].values()),
        list(bodies[0]["featurewatch"]["scores"].values()), atol=1e-5,
    )  # fmt: skip

    # The OpenAI SDK reads the same stream; its usage counts the tokens the client got.
    sdk = list(client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": prompts[0]}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in sdk if c.choices) == text
    assert sdk[-1].usage.completion_tokens == 12
    assert [c.model_extra["featurewatch"]["flagged"] for c in sdk if "featurewatch" in
            c.model_extra] == [bodies[0]["featurewatch"]["flagged"]]  # fmt: skip

    # block: the answer refused; a stream ended within `every` tokens of the start.
    hot = {"tag": "hot", "threshold": 0.5, "gate": "block",
           "probe": random_probe("hot", [2], intercept=40.0)}  # fmt: skip
    set_verdicts(cfg, read_verdicts({"tags": [*tags, hot], "every": 4}))
    blocked = raw_chat(cfg, prompts[0], max_tokens=12)
    body = blocked.json()
    assert body["choices"][0]["message"]["content"] == REFUSAL
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["featurewatch"]["action"] == "blocked"
    assert "hot" in body["featurewatch"]["flagged_tags"]
    assert blocked.headers["x-featurewatch-verdict"].startswith("flagged")
    _, chunks = streamed(cfg, prompts[0], max_tokens=12)
    sent = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[-1]["featurewatch"]["action"] == "stopped"
    assert len(tokenizer(sent, add_special_tokens=False)["input_ids"]) <= 4 < 12

    # regenerate: answered again with the tag's steering, as a steered replica answers.
    torch.manual_seed(0)
    sae = build("topk", 128, 32, k=4)
    with torch.no_grad():
        sae.W_dec.normal_()
    steer = steer_from_sae(sae, 3, layer=LAYER, site="resid_post", scale=50.0)
    hot = {**hot, "gate": "regenerate", "steering": [asdict(steer)]}
    set_verdicts(cfg, read_verdicts({"tags": [*tags, hot], "every": 4}))
    again = raw_chat(cfg, prompts[0], max_tokens=12).json()
    assert again["featurewatch"]["action"] == "regenerated"
    assert again["featurewatch"]["first"]["flagged_tags"][-1] == "hot"
    set_verdicts(cfg, None)
    set_steering(cfg, [steer])
    steered = raw_chat(cfg, prompts[0], max_tokens=12).json()
    set_steering(cfg, [])
    assert again["choices"][0]["message"] == steered["choices"][0]["message"]
    assert steered["choices"][0]["message"] != bodies[0]["choices"][0]["message"]
    assert "featurewatch" not in raw_chat(cfg, prompts[0], max_tokens=3).json()  # off

    # The verdicts reached the collector; a client may not set featurewatch's own xargs.
    found = verdict_rows(cfg, handle)
    assert found[("hot", "blocked", 0)] == 1 and found[("hot", "stopped", 0)] == 1
    assert found[("hot", "regenerated", 0)] == 1 and found[("hot", "flagged", 1)] == 1
    bad = raw_chat(cfg, "hi", max_tokens=3, vllm_xargs={"featurewatch_verdict": "x"})
    assert bad.status_code == 400 and "reserved for featurewatch" in bad.text


def verdict_rows(cfg, handle) -> dict:
    """(tag, action, attempt) -> how many verdicts the collector has spooled."""
    assert handle.flush_capture.remote(60.0).result(timeout_s=90)
    time.sleep(0.5)
    found = defaultdict(int)
    for path in sealed_segments(cfg.spool_dir):
        for raw in read_segment(path):
            for v in pb.ActivationBatch.FromString(raw).verdicts:
                found[(v.tag, v.action, v.attempt)] += 1
    return found


def test_settings_vllm_refuses_fail_before_any_replica_starts(served, vllm_llama_dir, tmp_path):
    cfg, _, _ = served
    model = cfg.model.model_dump()

    def config(layers=(LAYER,), **changes):
        return build_config(
            {
                "home": str(tmp_path),
                "model": {**model, **changes},
                "capture": {"layers": list(layers)},
            }
        )

    with pytest.raises(ConfigError, match=r"capture.layers \[9\] out of range"):
        check_servable(config(layers=[9]))
    refused = "(?s)vLLM refuses the engine settings.*"
    with pytest.raises(ConfigError, match=refused + "max_model_len"):
        check_servable(config(vllm={"max_model_len": 4096}))
    unknown = tmp_path / "unknown-architecture"
    shutil.copytree(vllm_llama_dir, unknown)
    settings = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(
        json.dumps({**settings, "architectures": ["NoSuchForCausalLM"]})
    )
    with pytest.raises(ConfigError, match=refused + "NoSuchForCausalLM"):
        check_servable(config(path=str(unknown)))
    with pytest.raises(ConfigError, match="model.engine"):
        config(engine="tgi")
    assert check_servable(config())[1] == 128


def test_a_realigned_version_is_served_by_vllm_as_canary_then_promoted(
    served, vllm_llama_dir, tmp_path
):
    """A realigned version as the fine-tune job leaves it (LoRA merged into the weights,
    saved with its tokenizer) runs as a vLLM canary, then is promoted. Runs last: the
    module's replica serves the new weights afterwards."""
    cfg, handle, client = served
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(vllm_llama_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    realigned = tmp_path / "realigned"
    get_peft_model(base, lora).merge_and_unload().save_pretrained(realigned)
    AutoTokenizer.from_pretrained(vllm_llama_dir).save_pretrained(realigned)
    messages = [{"role": "user", "content": "How do I keep basil alive?"}]

    assert start_canary(cfg, realigned, "v2-realigned", share=1.0)["version"] == "v2-realigned"
    answer = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=4, temperature=0
    )
    assert answer.system_fingerprint == "v2-realigned"
    assert handle.steering_status.remote().result()["canary_forwarded"] >= 1
    versions: dict[str, set[str]] = {}
    canary = serve.get_app_handle(canary_app_name(cfg))
    by_pos = captured_rows(cfg, handle, canary, versions=versions)[answer.id]
    assert versions[answer.id] == {"v2-realigned"}
    merged = AutoModelForCausalLM.from_pretrained(realigned, dtype=torch.float32)
    tokens = [by_pos[p][0] for p in sorted(by_pos)]
    assert sorted(by_pos) == list(range(len(tokens)))
    assert assert_forward_matches(merged, tokens, by_pos) > 10  # the merged weights ran

    assert promote_model(cfg, realigned, "v2-realigned")["version"] == "v2-realigned"
    answer = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=4, temperature=0
    )
    assert answer.system_fingerprint == "v2-realigned"
    assert canary_app_name(cfg) not in serve.status().applications
