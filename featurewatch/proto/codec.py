"""Build, decode and validate ActivationBatch messages.

Vectors travel as raw little-endian bytes; validation decodes them once, so the finite
check and the spool write share that work.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from featurewatch.errors import BatchValidationError
from featurewatch.proto import activations_pb2 as pb

# dtype enum -> (torch dtype, bytes per value)
WIRE_DTYPES: dict[int, tuple[torch.dtype, int]] = {
    pb.FLOAT16: (torch.float16, 2),
    pb.BFLOAT16: (torch.bfloat16, 2),
    pb.FLOAT32: (torch.float32, 4),
}
DTYPE_BY_NAME = {"float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16, "float32": pb.FLOAT32}
# The serving engines a batch may name ("" from senders older than the field).
ENGINES = ("", "hf", "vllm")
# Model ids become lake partition folders: keep them path-safe.
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ENUM_BY_TORCH = {torch_dtype: enum for enum, (torch_dtype, _) in WIRE_DTYPES.items()}


def make_batch(
    vectors: torch.Tensor,
    *,
    model: str,
    model_version: str,
    layer: int,
    site: str,
    request_ids: list[str],
    request_index: list[int],
    token_pos: list[int],
    token_id: list[int],
    ts_unix_nanos: list[int],
    token_text: list[str] | None = None,
    replica_id: str = "",
    engine: str = "hf",
) -> pb.ActivationBatch:
    """Pack [rows, width] vectors and their per-row metadata into one message."""
    if vectors.dtype not in _ENUM_BY_TORCH:
        raise ValueError(f"unsupported vector dtype {vectors.dtype}")
    rows, width = vectors.shape
    # View as bytes first: numpy has no bfloat16.
    raw = vectors.contiguous().view(torch.uint8)
    return pb.ActivationBatch(
        replica_id=replica_id,
        model=model,
        model_version=model_version,
        layer=layer,
        site=site,
        dtype=_ENUM_BY_TORCH[vectors.dtype],
        rows=rows,
        width=width,
        data=raw.numpy().tobytes(),
        request_ids=request_ids,
        request_index=request_index,
        token_pos=token_pos,
        token_id=token_id,
        ts_unix_nanos=ts_unix_nanos,
        token_text=token_text or [],
        engine=engine,
    )


def unpack_vectors(batch: pb.ActivationBatch) -> np.ndarray:
    """The batch's vectors as float32 [rows, width]. Assumes the batch was validated."""
    torch_dtype, _ = WIRE_DTYPES[batch.dtype]
    flat = torch.frombuffer(bytearray(batch.data), dtype=torch_dtype)
    return flat.reshape(batch.rows, batch.width).float().numpy()


def validate_batch(
    batch: pb.ActivationBatch,
    *,
    expected_width: int | dict[str, int] | None = None,
    max_bytes: int | None = None,
    allowed_models: set[str] | None = None,
) -> None:
    """Raise BatchValidationError naming the first bad field; return None when valid.
    `expected_width` per model ({model: width}, a fleet's) is also the allow-list."""
    if batch.seq == 0:
        raise BatchValidationError("seq", "must be >= 1")
    if batch.engine not in ENGINES:
        raise BatchValidationError(
            "engine", f"unknown engine {batch.engine!r}; expected 'hf', 'vllm' or empty"
        )
    if not batch.replica_id:
        raise BatchValidationError("replica_id", "must not be empty")
    if not batch.model:
        raise BatchValidationError("model", "must not be empty")
    if not MODEL_ID.match(batch.model):
        raise BatchValidationError(
            "model", f"{batch.model!r} is not a valid model id (letters, digits, '._-')"
        )
    if isinstance(expected_width, dict):
        if batch.model not in expected_width:
            raise BatchValidationError("model", f"unknown model {batch.model!r}")
        expected_width = expected_width[batch.model]
    if allowed_models is not None and batch.model not in allowed_models:
        raise BatchValidationError("model", f"unknown model {batch.model!r}")
    _validate_verdicts(batch.verdicts)
    if batch.rows == 0 and batch.verdicts:
        # verdicts only: no vectors and no per-row metadata
        for name in ("data", "request_index", "token_pos", "token_id", "ts_unix_nanos"):
            if len(getattr(batch, name)):
                raise BatchValidationError(name, "must be empty in a batch of verdicts only")
        return
    if batch.rows == 0:
        raise BatchValidationError("rows", "empty batch (rows = 0 and no verdicts)")
    if batch.dtype not in WIRE_DTYPES:
        raise BatchValidationError(
            "dtype", f"unknown dtype {batch.dtype}; expected FLOAT16, BFLOAT16 or FLOAT32"
        )
    if batch.width == 0:
        raise BatchValidationError("width", "must be positive")
    if expected_width is not None and batch.width != expected_width:
        raise BatchValidationError(
            "width", f"got {batch.width}, the collector expects {expected_width} for {batch.model}"
        )
    _, itemsize = WIRE_DTYPES[batch.dtype]
    data = batch.data  # each access copies the bytes: read it once
    if max_bytes is not None and len(data) > max_bytes:
        raise BatchValidationError(
            "data", f"{len(data)} bytes exceeds the limit of {max_bytes}", too_large=True
        )
    expected = batch.rows * batch.width * itemsize
    if len(data) != expected:
        raise BatchValidationError(
            "data",
            f"has {len(data)} bytes; rows x width x itemsize = "
            f"{batch.rows} x {batch.width} x {itemsize} = {expected}",
        )
    for name in ("request_index", "token_pos", "token_id", "ts_unix_nanos"):
        if len(getattr(batch, name)) != batch.rows:
            raise BatchValidationError(
                name, f"has {len(getattr(batch, name))} entries, expected rows = {batch.rows}"
            )
    if batch.token_text and len(batch.token_text) != batch.rows:
        raise BatchValidationError(
            "token_text", f"has {len(batch.token_text)} entries, expected 0 or {batch.rows}"
        )
    if batch.request_index and max(batch.request_index) >= len(batch.request_ids):
        raise BatchValidationError(
            "request_index", f"points past request_ids ({len(batch.request_ids)} entries)"
        )
    if not _all_finite(batch.dtype, data):
        raise BatchValidationError("data", "contains NaN or Inf values")


VERDICT_ACTIONS = ("none", "flagged", "blocked", "regenerated", "stopped")
# Verdicts become lake rows: bounded in number and in every string's length.
MAX_VERDICTS = 4096
_VERDICT_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$")


def _validate_verdicts(verdicts) -> None:
    if len(verdicts) > MAX_VERDICTS:
        raise BatchValidationError(
            "verdicts", f"{len(verdicts)} verdicts exceeds the limit of {MAX_VERDICTS}"
        )
    for i, v in enumerate(verdicts):
        for name in ("request_id", "tag", "probe"):
            if not _VERDICT_TEXT.match(getattr(v, name)):
                raise BatchValidationError(
                    f"verdicts[{i}].{name}",
                    f"{getattr(v, name)!r} is not a valid id (letters, digits, '._:/-')",
                )
        for name in ("score", "threshold"):
            value = getattr(v, name)
            if not (np.isfinite(value) and 0 <= value <= 1 + 1e-9):
                raise BatchValidationError(f"verdicts[{i}].{name}", f"{value} is not in [0, 1]")
        if v.action not in VERDICT_ACTIONS:
            raise BatchValidationError(
                f"verdicts[{i}].action",
                f"unknown action {v.action!r}; expected one of {', '.join(VERDICT_ACTIONS)}",
            )
        if v.attempt > 1:
            raise BatchValidationError(f"verdicts[{i}].attempt", f"{v.attempt} is not 0 or 1")
        if v.ts_unix_nanos <= 0:
            raise BatchValidationError(f"verdicts[{i}].ts_unix_nanos", "must be positive")


# A 16-bit float is NaN or Inf exactly when all its exponent bits are set: as uint16 the
# positive ones lie in [POS, 0x7FFF] and the negative ones in [NEG, 0xFFFF].
_NON_FINITE_FROM = {pb.FLOAT16: (0x7C00, 0xFC00), pb.BFLOAT16: (0x7F80, 0xFF80)}


def _all_finite(dtype: int, data: bytes) -> bool:
    """Checks the raw bytes without converting or temporary arrays: two max reductions.
    Read as int16 the negative values sort below every positive one, so the max finds a
    positive NaN/Inf; read as uint16 the negative ones sort on top, so the max finds
    a negative NaN/Inf."""
    if dtype == pb.FLOAT32:
        return bool(np.isfinite(np.frombuffer(data, dtype="<f4")).all())
    positive_from, negative_from = _NON_FINITE_FROM[dtype]
    bits = np.frombuffer(data, dtype="<u2")
    return int(bits.max()) < negative_from and int(bits.view("<i2").max()) < positive_from
