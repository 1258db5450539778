"""Serving throughput on SmolLM2: batching in the hf engine, and the vllm engine against it.

1. The transformers replica's BatchGenerator (capture on, resid_post at layer 15, every
   token) generates the same prompts once with batch 1 and once with batch 8: tokens/s
   for each and their ratio.
2. At the same concurrency (`--concurrency`, default 16), both engines monitored as a
   replica runs them (5% of tokens at layer 15, streamed to a real collector): the hf
   engine in static batches of 8 (its replica's max_batch_size), the vllm engine with that many
   requests submitted together (continuous batching). Every vllm request generates
   exactly `--max-tokens` tokens; hf answers stop at EOS or there. Prints tokens/s for
   each and vllm/hf.

    .venv/bin/python benchmarks/serve_batching.py [--prompts 16] [--max-tokens 32]
        [--concurrency 16] [--rounds 3] [--skip-vllm]
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
from featurewatch.capture.sampler import SamplingPolicy
from featurewatch.capture.sender import ActivationSender
from featurewatch.config import build_config, default_home

sys.path.insert(0, str(Path(__file__).parent))
from capture_overhead import LAYER, chat_texts, chats, one_round, vllm_config, vllm_round  # noqa: E402
from ingest import TOKEN, start_collector  # noqa: E402


def tokens_per_second(gen: BatchGenerator, prompts: list[str], batch: int, max_tokens: int):
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch]]
        result = gen.generate(chats, [max_tokens] * len(chats))
        tokens += sum(result.completion_tokens)
    return tokens / (time.perf_counter() - start)


def batching(model, tok, args) -> None:
    capture = ActivationCapture(model, [LAYER])
    gen = BatchGenerator(model, tok, capture)
    prompts = [p["prompt"] for p in load_prompts("everyday")][: args.prompts]
    with capture:
        gen.generate([[{"role": "user", "content": "warm up"}]], [4])
        single = tokens_per_second(gen, prompts, 1, args.max_tokens)
        batched = tokens_per_second(gen, prompts, 8, args.max_tokens)
    print(f"batch 1: {single:.1f} generated tokens/s")
    print(f"batch 8: {batched:.1f} generated tokens/s")
    print(f"ratio batch8/batch1: {batched / single:.2f}")


def hf_engine(model, tok, args, address: str) -> float:
    """The hf engine at the concurrency, as its replica runs it: static batches of
    model.max_batch_size (8) one after the other. An answer that ends early (EOS) counts
    only its own tokens, though its batch runs until the longest ends; SmolLM2's
    everyday answers rarely end within 32 tokens."""
    size = build_config({}).model.max_batch_size
    capture = ActivationCapture(model, [LAYER], "resid_post", SamplingPolicy(0.05, seed=0))
    gen = BatchGenerator(model, tok, capture)
    sender = ActivationSender(address, TOKEN, "batching-bench-hf")
    requests = chats(args.concurrency)
    tokens, seconds = 0, 0.0
    with capture:
        gen.generate(requests[:2], [4, 4])  # warm-up
        for _ in range(args.rounds):
            for start in range(0, len(requests), size):
                n, s = one_round(gen, requests[start : start + size], args.max_tokens, sender)
                tokens, seconds = tokens + n, seconds + s
    sender.flush(60)
    sender.close()
    return tokens / seconds


async def vllm_engine(folder: Path, args, address: str) -> float:
    from featurewatch.actors.vllm_server import flush_engine_capture, start_engine

    cfg = vllm_config(0.05, args.concurrency)
    engine, _ = await start_engine(cfg, folder, "batching-bench-vllm", [address], TOKEN)
    try:
        prompts = chat_texts(folder, args.concurrency)
        await vllm_round(engine, prompts[:2], 4, "warm-up")
        tokens, seconds = 0, 0.0
        for r in range(args.rounds):
            n, s = await vllm_round(engine, prompts, args.max_tokens, f"round{r}")
            tokens, seconds = tokens + n, seconds + s
        await flush_engine_capture(engine, 60.0)
    finally:
        engine.shutdown()
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-vllm", action="store_true", help="only the hf batching figure")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = resolve_model_path(None, default_home() / "models")
    model, tok = load_model(folder)
    batching(model, tok, args)
    if args.skip_vllm:
        return
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN)
        collector, address = start_collector(Path(tmp) / "spool", token_file)
        try:
            hf = hf_engine(model, tok, args, address)
            del model  # the hf weights are not needed while vLLM runs
            vllm = asyncio.run(vllm_engine(folder, args, address))
        finally:
            collector.terminate()
            collector.wait(30)
    print(f"{args.concurrency} concurrent requests x {args.max_tokens} tokens, monitored:")
    print(f"hf engine (static batches of 8): {hf:.1f} generated tokens/s")
    print(f"vllm engine (continuous batching): {vllm:.1f} generated tokens/s")
    print(f"ratio vllm/hf: {vllm / hf:.2f}")


if __name__ == "__main__":  # vLLM's engine starts a child process that imports this file
    main()
