"""Turn one generate call's captured vectors into ActivationBatch messages."""

from __future__ import annotations

from featurewatch.capture.generation import GenerationResult
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import make_batch


def pack_batches(
    result: GenerationResult,
    request_ids: list[str],
    tokenizer,
    *,
    model: str,
    model_version: str,
    rows_per_batch: int,
) -> list[pb.ActivationBatch]:
    """At most `rows_per_batch` vectors per message, with token ids and texts."""
    batches = []
    for captured in result.captured:
        token_ids = captured.token_id.tolist()
        texts = tokenizer.batch_decode([[t] for t in token_ids])
        for start in range(0, len(token_ids), rows_per_batch):
            end = start + rows_per_batch
            index = captured.request_index[start:end].tolist()
            used = sorted(set(index))
            remap = {r: n for n, r in enumerate(used)}
            batches.append(
                make_batch(
                    captured.vectors[start:end],
                    model=model,
                    model_version=model_version,
                    layer=captured.layer,
                    site=captured.site,
                    request_ids=[request_ids[r] for r in used],
                    request_index=[remap[r] for r in index],
                    token_pos=captured.token_pos[start:end].tolist(),
                    token_id=token_ids[start:end],
                    ts_unix_nanos=[captured.ts_unix_nanos] * len(index),
                    token_text=texts[start:end],
                )
            )
    return batches
