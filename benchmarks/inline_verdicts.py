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

    .venv/bin/python benchmarks/inline_verdicts.py [--rounds 8] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import numpy as np
import torch

from featurewatch.analysis.probes import Probe, candidate_layers
from featurewatch.analysis.prompts import load_prompts
from featurewatch.analysis.verdicts import InlineScorer, VerdictSettings
from featurewatch.capture.generation import BatchGenerator
from featurewatch.capture.hooks import ResponseRecorder, num_layers
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.config import default_home

BATCH = 8


def random_probe(width: int, layers: list[int]) -> Probe:
    rng = np.random.default_rng(0)
    columns = width * len(layers)
    return Probe(
        tag="misalignment", sae_version="bench", feature_ids=[], center=[0.0] * columns,
        scale=[1.0] * columns, coef=(rng.normal(size=columns) * 0.01).tolist(), intercept=0.0,
        fitted_on={}, family="multilayer", layers=layers,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(resolve_model_path(None, default_home() / "models"))
    width, depth = int(model.config.hidden_size), num_layers(model)
    layers = candidate_layers(depth, 15)
    probe = random_probe(width, layers)
    settings = VerdictSettings(tags=[{"tag": "misalignment", "threshold": 0.5,
                                      "probe": asdict(probe)}])  # fmt: skip
    scorer = InlineScorer(settings, width, depth)
    recorder = ResponseRecorder(model, scorer.layers, scorer.site)
    generator = BatchGenerator(model, tokenizer)
    prompts = load_prompts("everyday")
    chats = [[{"role": "user", "content": prompts[i]["prompt"]}] for i in range(BATCH)]
    limits = [args.max_tokens] * BATCH
    generator.generate(chats[:2], [4, 4], recorder=recorder)  # warm-up
    seconds = {"off": [], "on": []}
    tokens = {"off": 0, "on": 0}
    scoring = []
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
    rate = {m: tokens[m] / sum(seconds[m]) for m in seconds}
    print(f"{args.rounds} alternating rounds of {BATCH} chats x up to {args.max_tokens} tokens, "
          f"probe over layers {layers}")  # fmt: skip
    for mode in ("off", "on"):
        p50, p95 = np.percentile(seconds[mode], [50, 95])
        print(f"verdicts {mode:>3}: {rate[mode]:.1f} answer tokens/s; response latency "
              f"p50 {p50:.2f} s, p95 {p95:.2f} s")  # fmt: skip
    added = np.array(seconds["on"]) - np.array(seconds["off"])
    p50, p95 = np.percentile(scoring, [50, 95]) * 1000
    print(f"scoring step alone (8 answers): p50 {p50:.1f} ms, p95 {p95:.1f} ms; "
          f"added latency per round p50 {np.percentile(added, 50):.2f} s, "
          f"p95 {np.percentile(added, 95):.2f} s")  # fmt: skip
    print(f"ratio on/off: {rate['on'] / rate['off']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
