"""What monitoring costs serving: SmolLM2 batches with capture off vs on, alternating.

"On" is everything a replica does for monitoring: hooks at one layer sampling 5% of token
positions, packing the vectors into ActivationBatch messages (with token texts) and
handing them to the sender, which streams them to a real collector process. "Off" is the
same generate call with no hooks. Both run the same 8 prompts with greedy decoding, so
the work is identical; rounds alternate to cancel drift. Prints generated tokens/s for
each and the ratio on/off (target >= 0.97).

    .venv/bin/python benchmarks/capture_overhead.py [--rounds 6] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
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
from featurewatch.config import default_home

sys.path.insert(0, str(Path(__file__).parent))
from ingest import TOKEN, start_collector  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(resolve_model_path(None, default_home() / "models"))
    chats = [[{"role": "user", "content": p["prompt"]}] for p in load_prompts("everyday")[:8]]
    plain = BatchGenerator(model, tok, None)
    capture = ActivationCapture(model, [15], "resid_post", SamplingPolicy(args.fraction, seed=0))
    monitored = BatchGenerator(model, tok, capture)
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN)
        collector, address = start_collector(Path(tmp) / "spool", token_file)
        sender = ActivationSender(address, TOKEN, "overhead-bench")
        plain.generate(chats[:2], [4, 4])  # warm-up
        totals = {"off": [0, 0.0], "on": [0, 0.0]}
        for _ in range(args.rounds):
            tokens, seconds = one_round(plain, chats, args.max_tokens)
            totals["off"][0] += tokens
            totals["off"][1] += seconds
            with capture:
                tokens, seconds = one_round(monitored, chats, args.max_tokens, sender)
            totals["on"][0] += tokens
            totals["on"][1] += seconds
        sender.flush(60)
        stats = sender.snapshot()
        sender.close()
        collector.terminate()
        collector.wait(30)
    off = totals["off"][0] / totals["off"][1]
    on = totals["on"][0] / totals["on"][1]
    print(f"{args.rounds} alternating rounds of 8 requests x {args.max_tokens} tokens")
    print(f"monitoring off: {off:.1f} tokens/s")
    print(
        f"monitoring on ({args.fraction:.0%} of tokens, layer 15): {on:.1f} tokens/s; "
        f"{stats.acked_vectors} vectors acked, {stats.dropped_vectors} dropped"
    )
    print(f"ratio on/off: {on / off:.3f}")


if __name__ == "__main__":
    main()
