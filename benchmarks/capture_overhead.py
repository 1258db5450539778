"""What monitoring costs serving: SmolLM2 with capture off vs on, alternating rounds.

"On" is everything a replica does for monitoring: hooks at one layer sampling 5% of token
positions, packing the vectors into ActivationBatch messages (with token texts) and
handing them to the sender, which streams them to a real collector process. "Off" is the
same requests with no hooks. Both run the same prompts with greedy decoding, so the work
is identical; rounds alternate to cancel drift. Prints generated tokens/s for each and
the ratio on/off (target >= 0.97).

--engine hf (default): the transformers replica's BatchGenerator, one static batch of
`--concurrency` (default 8) chats per round.
--engine vllm: vLLM's async engine as the vLLM replica runs it (capture in its worker),
`--concurrency` (default 16) requests submitted together per round, each generating
exactly `--max-tokens` tokens (ignore_eos); off removes the hooks in the same engine.

    .venv/bin/python benchmarks/capture_overhead.py [--engine hf|vllm] [--rounds 6]
        [--max-tokens 32] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

from featurewatch.analysis.prompts import load_prompts
from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.hooks import ActivationCapture
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.capture.packing import pack_batches
from featurewatch.capture.sampler import SamplingPolicy
from featurewatch.capture.sender import ActivationSender
from featurewatch.config import build_config, default_home

sys.path.insert(0, str(Path(__file__).parent))
from ingest import TOKEN, start_collector  # noqa: E402

LAYER = 15


def chats(n: int) -> list[list[dict]]:
    prompts = load_prompts("everyday")
    return [[{"role": "user", "content": prompts[i % len(prompts)]["prompt"]}] for i in range(n)]


def one_round(gen: BatchGenerator, chats, max_tokens, sender=None) -> tuple[int, float]:
    start = time.perf_counter()
    result = gen.generate(chats, [max_tokens] * len(chats))
    if sender is not None:
        ids = [f"req-{i}" for i in range(len(chats))]
        for batch in pack_batches(
            result, ids, gen.tokenizer, model="smollm2", model_version="v1", rows_per_batch=256
        ):
            sender.submit(batch)
    return sum(result.completion_tokens), time.perf_counter() - start


def hf_rounds(args, folder: Path, address: str) -> tuple[dict, str]:
    torch.set_num_threads(2)
    model, tok = load_model(folder)
    requests = chats(args.concurrency)
    plain = BatchGenerator(model, tok, None)
    capture = ActivationCapture(model, [LAYER], "resid_post", SamplingPolicy(args.fraction, seed=0))
    monitored = BatchGenerator(model, tok, capture)
    sender = ActivationSender(address, TOKEN, "overhead-bench")
    plain.generate(requests[:2], [4, 4])  # warm-up
    totals = {"off": [0, 0.0], "on": [0, 0.0]}
    for _ in range(args.rounds):
        tokens, seconds = one_round(plain, requests, args.max_tokens)
        totals["off"][0] += tokens
        totals["off"][1] += seconds
        with capture:
            tokens, seconds = one_round(monitored, requests, args.max_tokens, sender)
        totals["on"][0] += tokens
        totals["on"][1] += seconds
    sender.flush(60)
    stats = sender.snapshot()
    sender.close()
    return totals, f"{stats.acked_vectors} vectors acked, {stats.dropped_vectors} dropped"


def vllm_config(fraction: float, concurrency: int):
    """The vLLM replica's settings for SmolLM2, capturing `fraction` of tokens at LAYER.
    Prefix caching off: every round sends the same prompts, and later rounds would skip
    their prefills."""
    options = {"max_num_seqs": max(concurrency, 1), "enable_prefix_caching": False}
    return build_config(
        {
            "model": {"engine": "vllm", "vllm": options},
            "capture": {"layers": [LAYER], "sample_fraction": fraction},
        }
    )


async def vllm_round(engine, prompts: list[str], max_tokens: int, tag: str) -> tuple[int, float]:
    """Submit every prompt at once (continuous batching); generated tokens and seconds."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> int:
        final = None
        async for output in engine.generate(prompts[i], params, request_id=f"{tag}-{i}"):
            final = output
        return len(final.outputs[0].token_ids)

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return sum(counts), time.perf_counter() - start


def chat_texts(folder: Path, n: int) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in chats(n)
    ]


async def vllm_rounds(args, folder: Path, address: str) -> tuple[dict, str]:
    from featurewatch.actors.vllm_server import flush_engine_capture, start_engine

    cfg = vllm_config(args.fraction, args.concurrency)
    engine, _ = await start_engine(cfg, folder, "overhead-bench", [address], TOKEN)
    try:
        prompts = chat_texts(folder, args.concurrency)
        await vllm_round(engine, prompts[:2], 4, "warm-up")
        totals = {"off": [0, 0.0], "on": [0, 0.0]}
        for r in range(args.rounds):
            # off-on, then on-off: drift over the run cancels
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                await engine.collective_rpc("fw_set_capture", args=(mode == "on",))
                tokens, seconds = await vllm_round(engine, prompts, args.max_tokens, f"{mode}{r}")
                totals[mode][0] += tokens
                totals[mode][1] += seconds
        await flush_engine_capture(engine, 60.0)
        (stats,) = await engine.collective_rpc("fw_stats")
    finally:
        engine.shutdown()
    if args.graphs:  # the same requests compiled, where the hooks cannot run
        engine, _ = await start_engine(cfg, folder, "overhead-bench", [address], TOKEN, eager=False)
        try:
            await engine.collective_rpc("fw_set_capture", args=(False,))
            await vllm_round(engine, prompts[:2], 4, "graphs-warm-up")
            totals["graphs"] = [0, 0.0]
            for r in range(args.rounds):
                tokens, seconds = await vllm_round(engine, prompts, args.max_tokens, f"graphs{r}")
                totals["graphs"][0] += tokens
                totals["graphs"][1] += seconds
        finally:
            engine.shutdown()
    return totals, f"{stats['acked_vectors']} vectors acked, {stats['dropped_vectors']} dropped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=None, help="8 (hf), 16 (vllm)")
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="vllm: also the same requests on a compiled engine (torch.compile; on a GPU also "
        "CUDA graphs), capture off, run after the eager one: what eager mode costs",
    )
    args = parser.parse_args()
    args.concurrency = args.concurrency or (8 if args.engine == "hf" else 16)
    if args.graphs and args.engine != "vllm":
        parser.error("--graphs needs --engine vllm")
    folder = resolve_model_path(None, default_home() / "models")
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN)
        collector, address = start_collector(Path(tmp) / "spool", token_file)
        try:
            if args.engine == "hf":
                totals, sent = hf_rounds(args, folder, address)
            else:
                totals, sent = asyncio.run(vllm_rounds(args, folder, address))
        finally:
            collector.terminate()
            collector.wait(30)
    off = totals["off"][0] / totals["off"][1]
    on = totals["on"][0] / totals["on"][1]
    print(
        f"{args.engine}: {args.rounds} alternating rounds of {args.concurrency} requests x "
        f"{args.max_tokens} tokens"
    )
    print(f"monitoring off: {off:.1f} tokens/s")
    print(
        f"monitoring on ({args.fraction:.0%} of tokens, layer {LAYER}): {on:.1f} tokens/s; {sent}"
    )
    print(f"ratio on/off: {on / off:.3f}")
    if "graphs" in totals:
        graphs = totals["graphs"][0] / totals["graphs"][1]
        print(f"compiled (not eager), monitoring off: {graphs:.1f} tokens/s")
        print(f"ratio eager on / compiled off: {on / graphs:.3f}")


if __name__ == "__main__":  # vLLM's engine starts a child process that imports this file
    main()
