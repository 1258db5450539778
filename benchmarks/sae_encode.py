"""SAE encode speed: a TopK SAE (d_in 576, d_sae 16384, k 32) against the bare matmul.

The limit on this machine is the bare matrix product `x @ W_enc` of the same shape and
dtype, measured in the same run. Three encoders are timed on the same fixed activation
set:
- in-process: `sae.encode_sparse(x)` (pre-activations, top-k, ReLU) in batches;
- the Ray Data pipeline with the whole SAE in one actor pool (S = 1);
- the sharded Ray Data pipeline (S = 2): two encoder pools each holding half the
  dictionary, the top-k merge, two decoder pools and the reconstruction error, end to
  end from an in-memory dataset to the consumed rows.
Each prints tokens/s and the ratio to the limit (targets: in-process >= 0.8, S = 2
pipeline >= 0.5), for float32 and bfloat16 weights; FVU is compared between the dtypes
so bf16 is only used where it costs no accuracy.

    .venv/bin/python benchmarks/sae_encode.py [--tokens 32768] [--skip-ray] [--device cuda]

On a GPU (`--device cuda`, in-process figures only) the same two are timed on the device.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from featurewatch.sae import TopKSAE
from featurewatch.sae.train import fvu

D_IN, D_SAE, K, BATCH = 576, 16384, 32, 4096


def make_sae(dtype: torch.dtype) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, D_SAE, K)
    with torch.no_grad():
        w = torch.randn(D_SAE, D_IN)
        w /= w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
    return sae.to(dtype).eval()


def best_of(fn, repeats: int = 3) -> float:
    """Fastest of a few runs, in seconds (the least disturbed by other processes); on a
    GPU each run waits for its kernels."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def in_process(sae: TopKSAE, x: torch.Tensor) -> tuple[float, float, float]:
    """(limit tokens/s, encoder tokens/s, fvu)."""
    xd = x.to(sae.dtype)
    w_enc = sae.W_enc.detach()
    batches = list(xd.split(BATCH))

    def bare():
        for b in batches:
            b @ w_enc

    def encode():
        for b in batches:
            sae.encode_sparse(b)

    limit = x.shape[0] / best_of(bare)
    rate = x.shape[0] / best_of(encode)
    indices, values = sae.encode_sparse(x[:4096])
    return limit, rate, fvu(x[:4096], sae.decode_sparse(indices, values))


def pipeline_seconds(sae: TopKSAE, x: np.ndarray, shards: int) -> float:
    """Wall time of one pipeline run over `x`, actor start-up included."""
    import ray

    from featurewatch.actors.sae_encoder import sharded_encode

    ds = ray.data.from_numpy(list(np.array_split(x, len(x) // BATCH))).rename_columns(
        {"data": "vector"}
    )
    ds = ds.materialize()
    # The whole machine is the encoder's budget; with S > 1 the S encode shards share
    # it (see sharded_encode) and run torch single-threaded, each on its own core.
    cpus = os.cpu_count() * 0.6  # the chain claims about 1.6x this in all
    threads = 1 if shards > 1 else os.cpu_count()
    start = time.perf_counter()
    out = sharded_encode(
        ds, sae, shards, batch_size=BATCH, cpus_per_actor=cpus, torch_threads=threads
    )
    n = sum(len(b["recon_error"]) for b in out.iter_batches(batch_size=None))
    assert n == len(x)
    return time.perf_counter() - start


def pipeline_rate(sae: TopKSAE, x: np.ndarray, shards: int) -> tuple[float, float]:
    """(marginal tokens/s, tokens/s counting actor start-up).

    A streaming pipeline starts its actors once, not per batch: the marginal rate,
    (N - N/4) / (T(N) - T(N/4)), is its throughput with the start-up cost cancelled.
    """
    quarter = pipeline_seconds(sae, x[: len(x) // 4], shards)
    full = pipeline_seconds(sae, x, shards)
    return (len(x) - len(x) // 4) / (full - quarter), len(x) / full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--skip-ray", action="store_true", help="in-process figures only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.device == "cuda":
        args.skip_ray = True  # the pipelines' figures are the CPU's
    torch.manual_seed(1)
    # Activation-like data: a few hundred directions, heavy-tailed magnitudes.
    basis = torch.randn(512, D_IN)
    codes = torch.relu(torch.randn(args.tokens, 512)) * (torch.rand(args.tokens, 512) < 0.05)
    x = (codes @ basis + 0.1 * torch.randn(args.tokens, D_IN)).to(args.device)
    print(f"TopK SAE d_in {D_IN}, d_sae {D_SAE}, k {K}; {args.tokens} tokens, {BATCH} per batch")
    if not args.skip_ray:
        import ray

        from featurewatch.actors.runtime import quiet_ray_logs

        quiet_ray_logs()
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for dtype in (torch.float32, torch.bfloat16):
        sae = make_sae(dtype).to(args.device)
        limit, rate, error = in_process(sae, x)
        name = str(dtype).removeprefix("torch.")
        print(f"{name}: bare x @ W_enc {limit:,.0f} tokens/s (the limit)")
        print(f"  in-process encode_sparse {rate:,.0f} tokens/s, ratio {rate / limit:.2f}")
        print(f"  FVU on this data {error:.4f}")
        if args.skip_ray:
            continue
        for shards in (1, 2):
            marginal, overall = pipeline_rate(sae, x.numpy(), shards)
            print(
                f"  Ray Data pipeline S={shards} (encode, merge, decode, recon error): "
                f"{marginal:,.0f} tokens/s, ratio {marginal / limit:.2f} "
                f"({overall:,.0f} tokens/s counting actor start-up)"
            )


if __name__ == "__main__":
    main()
