"""Train a TopK SAE on spooled activations with Ray Train (data-parallel TorchTrainer).

Each worker reads its shard of the spool through Ray Data, runs the plain-torch step
from featurewatch.sae.train under DDP, and rank 0 checkpoints the SAE in the SAELens
layout. The driver then evaluates it and registers the version in the catalog.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from featurewatch.platform.config import FeaturewatchConfig
from featurewatch.sae import load
from featurewatch.sae.model import TopKSAE
from featurewatch.sae.train import (
    evaluate,
    init_from_data,
    normalize_decoder,
    reconstruction_loss,
)


@dataclass
class TrainedSAE:
    sae: TopKSAE
    version: str
    path: Path
    metrics: dict


def _train_loop(config: dict) -> None:
    torch.manual_seed(config["seed"])
    sae = TopKSAE(config["d_in"], config["d_sae"], config["k"], metadata=config["metadata"])
    # Same seed on every rank: identical initial weights, as DDP expects.
    init_from_data(sae, torch.from_numpy(config["init_sample"]), seed=config["seed"])
    model = ray.train.torch.prepare_model(sae)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    epochs = config["epochs"]
    for epoch in range(epochs):
        losses = []
        for batch in shard.iter_torch_batches(
            batch_size=config["batch_size"], dtypes=torch.float32, drop_last=True
        ):
            x = batch["vector"]
            loss = reconstruction_loss(x, model(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            normalize_decoder(sae)
            losses.append(float(loss))
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan")}
        if epoch + 1 < epochs:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                sae.save(tmp)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_sae(
    cfg: FeaturewatchConfig, data: ray.data.Dataset, d_in: int, *, version: str | None = None
) -> TrainedSAE:
    """Train on `data` (a dataset with a `vector` column); save under cfg.sae_dir."""
    sc = cfg.sae
    # Materialised once: every epoch re-reads blocks from the object store, not the spool.
    data = data.select_columns(["vector"]).materialize()
    sample = np.stack([row["vector"] for row in data.take(4096)]).astype(np.float32)
    metadata = {
        "model_name": cfg.model.name,
        "model_version": cfg.model.version,
        "hook_layer": cfg.capture.layer,
        "hook_name": f"model.layers.{cfg.capture.layer}.{cfg.capture.site}",
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "d_in": d_in,
            "d_sae": sc.d_sae,
            "k": sc.k,
            "lr": sc.lr,
            "epochs": sc.epochs,
            "batch_size": sc.batch_size,
            "seed": sc.seed,
            "init_sample": sample,
            "metadata": metadata,
        },
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers, resources_per_worker={"CPU": sc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=f"sae-{int(time.time())}", storage_path=str(cfg.home / "ray_train")
        ),
        datasets={"train": data},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"SAE training produced no checkpoint: {result.error}")
    version = version or time.strftime("sae-L{layer}-%Y%m%d-%H%M%S").format(layer=cfg.capture.layer)
    target = cfg.sae_dir / version
    with result.checkpoint.as_directory() as ckpt:
        sae = load(ckpt)
    sae.save(target)
    metrics = evaluate(sae, torch.from_numpy(sample))
    metrics["final_loss"] = result.metrics.get("loss")
    return TrainedSAE(sae=sae, version=version, path=target, metrics=metrics)
