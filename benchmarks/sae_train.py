"""SAE training speed: the Ray Train job against a plain single-process PyTorch loop.

Both train the same TopK SAE (d_in 576, d_sae 8192, k 32, as in the docs' quality
run) with the same step (featurewatch.sae.train.SAETrainingStep: TopK, sparse decode,
AuxK), the same Adam optimizer, schedule and decoder normalisation, on the same
in-memory activations. The plain loop slices a tensor; the Ray Train job reads its
Ray Data shard, runs under DDP, tracks dead latents across workers and checkpoints
every 100 steps. Throughput is timed inside the loop, from the end of the first step
to the last (both sides the same way; worker start-up is reported separately). Prints
tokens/s for each and the ratio Ray Train / plain (target >= 0.9 with one worker), and
the same for two workers.

    .venv/bin/python benchmarks/sae_train.py [--tokens 98304] [--batch-size 2048]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from featurewatch.sae import TopKSAE
from featurewatch.sae.train import (
    DeadLatents,
    SAETrainingStep,
    TrainSettings,
    init_from_data,
    lr_factor,
    optimizer_step,
)

D_IN, D_SAE, K = 576, 8192, 32


def activations(tokens: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(1024, D_IN, generator=gen)
    codes = torch.relu(torch.randn(tokens, 1024, generator=gen))
    codes *= torch.rand(tokens, 1024, generator=gen) < 0.03
    return (codes @ basis + 0.1 * torch.randn(tokens, D_IN, generator=gen)).numpy()


def plain_loop(x: np.ndarray, batch_size: int, threads: int) -> float:
    """Tokens/s of the single-process loop, first step excluded."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = torch.from_numpy(x)
    sae = TopKSAE(D_IN, D_SAE, K)
    init_from_data(sae, data[:8192])
    settings = TrainSettings(dead_after_tokens=200_000)
    step_fn = SAETrainingStep(sae, settings)
    opt = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    dead = DeadLatents(D_SAE, settings.dead_after_tokens)
    sae.train()
    steps = len(x) // batch_size
    started = None
    for step in range(steps):
        batch = data[step * batch_size : (step + 1) * batch_size]
        lr = settings.lr * lr_factor(step, steps, settings)
        _, stats = optimizer_step(step_fn, opt, sae, batch, dead.mask(), lr)
        dead.update(stats["fired"], batch_size)
        if step == 0:
            started = time.perf_counter()
    return (steps - 1) * batch_size / (time.perf_counter() - started)


def ray_train(x: np.ndarray, batch_size: int, workers: int, home: str) -> tuple[float, float]:
    """(tokens/s inside the loop, wall seconds of the whole job)."""
    import ray

    from featurewatch.config import build_config
    from featurewatch.platform.jobs.train_sae import train_sae

    cpus = os.cpu_count()
    cfg = build_config(
        {
            "home": home,
            "sae": {
                "d_sae": D_SAE,
                "k": K,
                "epochs": 1,
                "batch_size": batch_size // workers,  # same tokens per optimizer step
                "num_workers": workers,
                "cpus_per_worker": cpus / workers,
                "checkpoint_every": 100,
            },
        }
    )
    ds = ray.data.from_numpy(x).rename_columns({"data": "vector"})
    started = time.perf_counter()
    trained = train_sae(cfg, ds, D_IN, version=f"bench-{workers}")
    return trained.metrics["tokens_per_s"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=98304)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()
    import ray

    from featurewatch.actors.runtime import quiet_ray_logs

    quiet_ray_logs()
    x = activations(args.tokens)
    steps = args.tokens // args.batch_size
    print(
        f"TopK SAE d_in {D_IN}, d_sae {D_SAE}, k {K}; {args.tokens} tokens, "
        f"{args.batch_size} per step, {steps} steps; {os.cpu_count()} cores"
    )
    plain = plain_loop(x, args.batch_size, os.cpu_count())
    print(f"plain single-process loop: {plain:,.0f} tokens/s")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as home:
        for workers in (1, 2):
            rate, wall = ray_train(x, args.batch_size, workers, home)
            print(
                f"Ray Train, {workers} worker(s): {rate:,.0f} tokens/s, ratio "
                f"{rate / plain:.2f} (whole job {wall:.1f} s with start-up and evaluation)"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
