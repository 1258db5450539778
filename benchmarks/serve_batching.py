"""Batched generation vs one request at a time, on SmolLM2 (the serving path's core).

Generates the same prompts once with batch 1 and once with batch 8 through the same
BatchGenerator the Serve replica uses (capture on, resid_post at layer 15, fraction 1.0),
and prints tokens/s for each and their ratio. Run:

    .venv/bin/python benchmarks/serve_batching.py [--prompts 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from featurewatch.analysis.prompts import load_prompts
from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.hooks import ActivationCapture
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.config import default_home


def tokens_per_second(gen: BatchGenerator, prompts: list[str], batch: int, max_tokens: int):
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch]]
        result = gen.generate(chats, [max_tokens] * len(chats))
        tokens += sum(result.completion_tokens)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(resolve_model_path(None, default_home() / "models"))
    capture = ActivationCapture(model, [15])
    gen = BatchGenerator(model, tok, capture)
    prompts = [p["prompt"] for p in load_prompts("everyday")][: args.prompts]
    with capture:
        gen.generate([[{"role": "user", "content": "warm up"}]], [4])
        single = tokens_per_second(gen, prompts, 1, args.max_tokens)
        batched = tokens_per_second(gen, prompts, 8, args.max_tokens)
    print(f"batch 1: {single:.1f} generated tokens/s")
    print(f"batch 8: {batched:.1f} generated tokens/s")
    print(f"ratio batch8/batch1: {batched / single:.2f}")


if __name__ == "__main__":
    main()
