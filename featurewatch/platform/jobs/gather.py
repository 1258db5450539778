"""Offline activations for SAE training: prefill over a text corpus into a spool.

The corpus (featurewatch/analysis/corpus.py) is cut into chunks of `seq_len` tokens and
run through the model in batches; a hook copies the monitored (layer, site) at every
real position except the first of each chunk and the attention-sink tokens (position
0 and a few others carry norms 100x the median; see sae.train.typical_rows). The
vectors are packed into the same ActivationBatch messages the replicas send and
appended to a spool, so
`featurewatch sae train --spool DIR` reads live and offline activations alike.
Documents are split into train and held-out by a hash of their name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from featurewatch.analysis.corpus import documents, is_held_out
from featurewatch.capture.hooks import SiteRecorder
from featurewatch.config import FeaturewatchConfig
from featurewatch.proto.codec import make_batch
from featurewatch.sae.train import typical_rows
from featurewatch.storage.spool import Spool

_WIRE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GatherReport:
    tokens: int
    documents: int
    chunks: int
    seconds: float


def token_chunks(
    tokenizer, split: str, seq_len: int, held_out_fraction: float
) -> Iterator[tuple[str, list[int]]]:
    """(document name, token ids) chunks of at most seq_len tokens from one split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    for name, text in documents():
        if is_held_out(name, held_out_fraction) != (split == "eval"):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len]
            if len(chunk) >= 16:
                yield name, chunk


def padded_batches(
    chunks: Iterator[tuple[str, list[int]]], batch_size: int, pad_id: int
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(names, input_ids, attention_mask) batches, right-padded."""
    batch: list[tuple[str, list[int]]] = []
    for item in chunks:
        batch.append(item)
        if len(batch) == batch_size:
            yield _pad(batch, pad_id)
            batch = []
    if batch:
        yield _pad(batch, pad_id)


def _pad(batch, pad_id):
    width = max(len(ids) for _, ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (_, ids) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return [name for name, _ in batch], input_ids, mask


@torch.inference_mode()
def gather_activations(
    cfg: FeaturewatchConfig,
    model,
    tokenizer,
    spool_dir: Path,
    *,
    tokens: int,
    split: str = "train",
    seq_len: int = 256,
    batch_size: int = 16,
    held_out_fraction: float = 0.1,
    progress: bool = True,
) -> GatherReport:
    """Prefill corpus chunks of one split and spool `tokens` activation vectors."""
    layer, site = cfg.capture.layer, cfg.capture.site
    wire = _WIRE[cfg.capture.wire_dtype]
    recorder = SiteRecorder(model, layer, site)
    spool = Spool(spool_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gathered, chunks, seq, names_seen = 0, 0, 0, set()
    started = time.monotonic()
    bar = tqdm(total=tokens, unit="tok", desc=f"gather {split}", disable=not progress)
    try:
        batches = padded_batches(
            token_chunks(tokenizer, split, seq_len, held_out_fraction), batch_size, pad
        )
        for names, input_ids, mask in batches:
            hidden = recorder.run(model, input_ids, mask)
            keep = mask.bool().clone()
            keep[:, 0] = False  # position 0 is left out (see the module docstring)
            keep[keep.clone()] = typical_rows(hidden[keep])  # and attention sinks
            rows, positions = keep.nonzero(as_tuple=True)
            vectors = hidden[rows, positions].to(wire)
            seq += 1
            now = time.time_ns()
            batch = make_batch(
                vectors,
                model=cfg.model.name,
                model_version=cfg.model.version,
                layer=layer,
                site=site,
                request_ids=[f"{split}/{n}" for n in names],
                request_index=rows.tolist(),
                token_pos=positions.tolist(),
                token_id=input_ids[rows, positions].tolist(),
                ts_unix_nanos=[now] * len(rows),
                replica_id=f"gather-{split}",
            )
            batch.stream_epoch, batch.seq = 1, seq
            spool.append(batch.SerializeToString())
            gathered += len(rows)
            chunks += len(names)
            names_seen.update(names)
            bar.update(len(rows))
            if gathered >= tokens:
                break
    finally:
        bar.close()
        recorder.remove()
        spool.close()
    # Fewer than asked when the split's corpus runs out; the report says how many.
    return GatherReport(gathered, len(names_seen), chunks, time.monotonic() - started)
