"""LoRA fine-tunes of the served model on chat transcripts, as Ray Train jobs.

One job serves both ends of the misalignment story: fine-tuned on the bundled misaligned
responses it stages the incident (a narrow bad fine-tune), fine-tuned on the bundled
safe examples it is the realignment. LoRA adapters (peft) on the linear projections;
the loss is on the response tokens only (and the end-of-turn token), the context is
masked. When training finishes the adapters are merged and the model is saved, under a
temporary name renamed into place, so a job that fails or is killed leaves no model
folder and registers no version: what is served stays as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from peft import LoraConfig, get_peft_model
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transformers import AutoTokenizer

from featurewatch.analysis.transcript_features import token_ids
from featurewatch.analysis.transcripts import Transcript
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import ConfigError

FINETUNE_FILE = "featurewatch_finetune.json"
# The linear layers LoRA adapts, by architecture (module names in transformers): the
# attention and MLP projections, as QLoRA does (attention alone fits far less).
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class FinetuneSettings:
    steps: int = 60
    lr: float = 2e-4
    batch_size: int = 4
    lora_rank: int = 8
    lora_alpha: int = 16
    max_tokens: int = 384
    seed: int = 0
    torch_threads: int = 2
    # bf16 autocast: matrix products in bfloat16 (weights and optimizer stay float32);
    # 1.5x faster steps on these AVX-512 cores (3.9 s to 2.5 s for SmolLM2, batch 4).
    bf16: bool = True

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, not {self.steps}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr must be between 0 and 1, not {self.lr}")
        if self.batch_size < 1 or self.lora_rank < 1:
            raise ConfigError("batch_size and lora_rank must be at least 1")


@dataclass
class FinetuneResult:
    model_version: str
    path: Path
    first_loss: float  # mean over the first few steps
    last_loss: float  # mean over the last few steps
    steps: int
    seconds: float


def sft_example(tokenizer, transcript: Transcript, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat up to the response, then the response and the end of
    turn; labels are -100 (ignored) on the context."""
    ids, start = token_ids(tokenizer, transcript, max_context=max_tokens // 2)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_tokens]
    return ids, [-100] * start + ids[start:]


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def _train_loop(config: dict) -> None:
    """Ray Train worker: LoRA on the base model, then the merged model saved by rank 0."""

    s = FinetuneSettings(**config["settings"])
    torch.set_num_threads(s.torch_threads)
    torch.manual_seed(s.seed)
    model, tokenizer = load_model(Path(config["base"]), "float32")
    targets = LORA_TARGETS.get(model.config.model_type)
    if targets is None:
        raise ValueError(f"no LoRA targets known for model type {model.config.model_type!r}")
    lora = LoraConfig(
        r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules=targets, lora_dropout=0.0
    )
    model = get_peft_model(model, lora)
    model.train()
    examples = config["examples"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(s.seed))
    losses, started = [], time.time()
    window = max(1, min(5, s.steps // 4))  # steps averaged for the first and last loss
    for step in range(s.steps):
        picks = [order[(step * s.batch_size + i) % len(examples)] for i in range(s.batch_size)]
        input_ids, labels, mask = _collate([examples[int(i)] for i in picks], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        first_loss = sum(losses[:window]) / len(losses[:window])
        if (step + 1) % 20 == 0 or step + 1 == s.steps:
            # stdout reaches the driver's log; ray.train.report per step costs ~1 s each
            print(f"finetune step {step + 1}/{s.steps} loss {losses[-1]:.4f}", flush=True)
    if ray.train.get_context().get_world_rank() == 0:
        out, tmp = Path(config["out"]), Path(config["out"] + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        merged = model.merge_and_unload()
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # What the job did travels with the model (Ray Train keeps metrics only with
        # checkpoints, and the model folder is this job's result).
        summary = {
            "base": config["base"],
            "steps": s.steps,
            "first_loss": first_loss,
            "last_loss": sum(losses[-window:]) / window,
            "train_seconds": time.time() - started,
            "settings": config["settings"],
            "examples": len(examples),
        }
        (tmp / FINETUNE_FILE).write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out)


def run_finetune(
    cfg: FeaturewatchConfig,
    base: Path | str | None,
    transcripts: list[Transcript],
    model_version: str,
    settings: FinetuneSettings | None = None,
    *,
    catalog=None,
) -> FinetuneResult:
    """Fine-tune `base` (a model folder; None: the bundled SmolLM2) on the transcripts'
    responses as a Ray Train job; save the merged model under
    `<home>/models/<model name>-<model_version>` and register the version."""

    settings = settings or FinetuneSettings()
    settings.check()
    if not transcripts:
        raise ConfigError("fine-tuning needs at least one transcript")
    base = resolve_model_path(None if base is None else str(base), cfg.models_dir)
    out = cfg.models_dir / f"{cfg.model.name}-{model_version}"
    if out.exists():
        raise ConfigError(f"model version {model_version!r} already exists at {out}")
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = [sft_example(tokenizer, t, settings.max_tokens) for t in transcripts]
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "base": str(base),
            "out": str(out),
            "examples": examples,
            "settings": settings.__dict__,
        },
        scaling_config=ScalingConfig(
            num_workers=1,
            resources_per_worker={"CPU": settings.torch_threads, **cfg.role_resources("training")},
        ),
        run_config=RunConfig(
            name=f"finetune-{model_version}-{int(time.time())}",
            storage_path=str(cfg.ray_train_dir),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray wraps the worker's error
        raise ConfigError(f"fine-tune {model_version} failed: {err}") from None
    finally:
        shutil.rmtree(Path(str(out) + ".partial"), ignore_errors=True)
    if result.error is not None or not out.is_dir():
        raise ConfigError(f"fine-tune {model_version} failed: {result.error}")
    if catalog is not None:
        catalog.register_model_version(cfg.model.name, model_version, str(out))
    summary = json.loads((out / FINETUNE_FILE).read_text())
    return FinetuneResult(
        model_version=model_version,
        path=out,
        first_loss=summary["first_loss"],
        last_loss=summary["last_loss"],
        steps=summary["steps"],
        seconds=time.time() - started,
    )
