"""What in-line verdicts cost serving: SmolLM2 answering batches of 8 chats with
scoring off vs on, alternating rounds.

"On" is what the transformers replica does for a verdict: the recorder keeps every
answer token's residual stream at the probe's layers (one decode step more, so the last
token of a full-length answer is computed too), then each answer is pooled and scored
and its verdict built. The probe is a multilayer one over the layers `featurewatch score
--fit` considers for SmolLM2 (6, 10, 15, 20, 24), the widest family; its coefficients
are random, which changes no cost. Both modes answer the same prompts greedily; rounds
alternate to cancel drift. Prints answer tokens/s for each and the ratio on/off (target
>= 0.95), and the latency of a response (a batch's wall time) p50 and p95 for each, with
the time of the scoring step alone.

On the vLLM engine (`--engine vllm`) "on" is what its replica does: the worker records
each answer's tokens at the probe's layers, the request asks one token more (cut back
for the client), and the replica fetches the answer from the worker and scores it.

    .venv/bin/python benchmarks/inline_verdicts.py [--engine hf|vllm] [--rounds 8]
        [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict

import numpy as np
import torch

from featurewatch.actors.vllm_verdicts import answer_rows
from featurewatch.analysis.probes import Probe, candidate_layers
from featurewatch.analysis.prompts import load_prompts
from featurewatch.analysis.verdicts import InlineScorer, VerdictSettings
from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.hooks import ResponseRecorder, num_layers
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.capture.vllm_worker import VERDICT_KEY
from featurewatch.config import build_config, default_home

BATCH = 8


def random_probe(width: int, layers: list[int]) -> Probe:
    rng = np.random.default_rng(0)
    columns = width * len(layers)
    return Probe(
        tag="misalignment", sae_version="bench", feature_ids=[], center=[0.0] * columns,
        scale=[1.0] * columns, coef=(rng.normal(size=columns) * 0.01).tolist(), intercept=0.0,
        fitted_on={}, family="multilayer", layers=layers,
    )  # fmt: skip


def hf_rounds(args, scorer, model, tokenizer, chats) -> tuple[dict, dict, list]:
    """Seconds per round and answer tokens per mode, and the scoring step's seconds."""
    recorder = ResponseRecorder(model, scorer.layers, scorer.site)
    generator = BatchGenerator(model, tokenizer)
    limits = [args.max_tokens] * BATCH
    generator.generate(chats[:2], [4, 4], recorder=recorder)  # warm-up
    seconds, tokens, scoring = {"off": [], "on": []}, {"off": 0, "on": 0}, []
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            start = time.perf_counter()
            result = generator.generate(chats, limits, recorder=recorder if mode == "on" else None)
            if mode == "on":
                scored = time.perf_counter()
                verdicts = [scorer.verdict(scorer.score(a)) for a in result.responses]
                scoring.append(time.perf_counter() - scored)
                assert len(verdicts) == BATCH
            seconds[mode].append(time.perf_counter() - start)
            tokens[mode] += sum(len(ids) for ids in result.token_ids)
    return seconds, tokens, scoring


async def vllm_rounds(args, scorer, folder, tokenizer, chats) -> tuple[dict, dict, list]:
    """As hf_rounds, on vLLM's engine with the replica's recording (capture off in both
    modes): 8 requests submitted together; on, each asks one token more, and its answer
    is fetched from the worker and scored as it completes. Seconds are per request."""
    from vllm import SamplingParams

    from featurewatch.actors.vllm_server import start_engine

    cfg = build_config({"model": {"engine": "vllm", "vllm": {
        "max_num_seqs": BATCH, "enable_prefix_caching": False}}})  # fmt: skip
    engine, shape = await start_engine(
        cfg, folder, "verdicts-bench", ["127.0.0.1:1"], "verdicts-bench-token-5f0c2e9b"
    )
    await engine.collective_rpc("fw_set_capture", args=(False,))
    await engine.collective_rpc("fw_set_verdicts", args=({
        "layers": scorer.layers, "site": scorer.site, "steering": {}},))  # fmt: skip
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in chats]  # fmt: skip
    scoring: list[float] = []

    async def one(i: int, mode: str, tag: str) -> float:
        start, key = time.perf_counter(), f"{tag}-{i}"
        extra = {VERDICT_KEY: key} if mode == "on" else None
        params = SamplingParams(max_tokens=args.max_tokens + (mode == "on"), temperature=0.0,
                                ignore_eos=True, extra_args=extra)  # fmt: skip
        async for _ in engine.generate(texts[i], params, request_id=key):
            pass
        if mode == "on":
            scored = time.perf_counter()
            (recorded,) = await engine.collective_rpc("fw_answer", args=(key, True))
            rows = answer_rows(recorded, 0, args.max_tokens, scorer.layers, shape["width"])
            scorer.verdict(scorer.score(rows))
            scoring.append(time.perf_counter() - scored)
        return time.perf_counter() - start

    try:
        await asyncio.gather(*(one(i, "on", "warm-up") for i in range(2)))
        seconds, tokens = {"off": [], "on": []}, {"off": 0, "on": 0}
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                start = time.perf_counter()
                latencies = await asyncio.gather(*(one(i, mode, f"{mode}{r}")
                                                   for i in range(BATCH)))  # fmt: skip
                seconds[mode].append(time.perf_counter() - start)
                seconds[f"{mode}-requests"] = seconds.get(f"{mode}-requests", []) + latencies
                tokens[mode] += BATCH * args.max_tokens
    finally:
        engine.shutdown()
    return seconds, tokens, scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = resolve_model_path(None, default_home() / "models")
    model, tokenizer = load_model(folder)
    width, depth = int(model.config.hidden_size), num_layers(model)
    layers = candidate_layers(depth, 15)
    probe = random_probe(width, layers)
    settings = VerdictSettings(tags=[{"tag": "misalignment", "threshold": 0.5,
                                      "probe": asdict(probe)}])  # fmt: skip
    scorer = InlineScorer(settings, width, depth)
    prompts = load_prompts("everyday")
    chats = [[{"role": "user", "content": prompts[i]["prompt"]}] for i in range(BATCH)]
    if args.engine == "hf":
        seconds, tokens, scoring = hf_rounds(args, scorer, model, tokenizer, chats)
        latency = {m: seconds[m] for m in ("off", "on")}
    else:
        del model
        seconds, tokens, scoring = asyncio.run(vllm_rounds(args, scorer, folder, tokenizer, chats))
        latency = {m: seconds[f"{m}-requests"] for m in ("off", "on")}
    rate = {m: tokens[m] / sum(seconds[m]) for m in ("off", "on")}
    print(f"{args.engine}: {args.rounds} alternating rounds of {BATCH} chats x up to "
          f"{args.max_tokens} tokens, probe over layers {layers}")  # fmt: skip
    for mode in ("off", "on"):
        p50, p95 = np.percentile(latency[mode], [50, 95])
        print(f"verdicts {mode:>3}: {rate[mode]:.1f} answer tokens/s; response latency "
              f"p50 {p50:.2f} s, p95 {p95:.2f} s")  # fmt: skip
    p50, p95 = np.percentile(scoring, [50, 95]) * 1000
    what = "8 answers" if args.engine == "hf" else "one answer, with its fetch"
    print(
        f"scoring step alone ({what}): p50 {p50:.1f} ms, p95 {p95:.1f} ms; added latency "
        f"p50 {np.percentile(latency['on'], 50) - np.percentile(latency['off'], 50):.2f} s, "
        f"p95 {np.percentile(latency['on'], 95) - np.percentile(latency['off'], 95):.2f} s"
    )
    print(f"ratio on/off: {rate['on'] / rate['off']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
