"""The wire codec round-trips vectors; validation names the bad field."""

import numpy as np
import pytest
import torch

from featurewatch.errors import BatchValidationError
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import make_batch, unpack_vectors, validate_batch


def batch_of(vectors: torch.Tensor, **overrides) -> pb.ActivationBatch:
    n = vectors.shape[0]
    b = make_batch(
        vectors,
        model="tiny",
        model_version="v1",
        layer=1,
        site="resid_post",
        request_ids=["r0"],
        request_index=[0] * n,
        token_pos=list(range(n)),
        token_id=[5] * n,
        ts_unix_nanos=[1] * n,
        token_text=["a"] * n,
        replica_id="rep",
    )
    b.seq = 1
    for key, value in overrides.items():
        if isinstance(value, list):  # repeated fields are replaced in place
            del getattr(b, key)[:]
            getattr(b, key).extend(value)
        else:
            setattr(b, key, value)
    return b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip(dtype):
    x = torch.randn(7, 16).to(dtype)
    b = pb.ActivationBatch.FromString(batch_of(x).SerializeToString())
    validate_batch(b, expected_width=16)
    np.testing.assert_array_equal(unpack_vectors(b), x.float().numpy())


def _bad(field, b, **kw):
    with pytest.raises(BatchValidationError) as info:
        validate_batch(b, **kw)
    assert info.value.field == field
    assert field in str(info.value)
    return info.value


def test_each_bad_field_is_named():
    x = torch.randn(4, 8, dtype=torch.float16)
    _bad("width", batch_of(x), expected_width=16)
    _bad("dtype", batch_of(x, dtype=0))
    _bad("dtype", batch_of(x, dtype=42))
    _bad("data", batch_of(x, data=batch_of(x).data[:-2]))
    _bad("rows", batch_of(x, rows=0))
    _bad("engine", batch_of(x, engine="tgi"))
    _bad("engine", batch_of(x, engine="HF"))  # exact, no case folding
    _bad("seq", batch_of(x, seq=0))
    _bad("replica_id", batch_of(x, replica_id=""))
    _bad("model", batch_of(x, model=""))
    _bad("model", batch_of(x, model="../etc"))
    _bad("model", batch_of(x), allowed_models={"other"})
    b = batch_of(x)
    del b.token_pos[-1]
    _bad("token_pos", b)
    b = batch_of(x)
    b.request_index[0] = 3
    _bad("request_index", b)
    assert _bad("data", batch_of(x), max_bytes=10).too_large


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(value, dtype):
    x = torch.randn(4, 8).to(dtype)
    x[2, 3] = value
    _bad("data", batch_of(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_check_agrees_with_torch_on_every_16_bit_pattern(dtype):
    from featurewatch.proto.codec import _ENUM_BY_TORCH, _all_finite

    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16)
    finite = torch.isfinite(patterns.view(dtype).float())
    ones = torch.zeros(64, dtype=torch.uint16)  # a finite row, one pattern put in it
    for bits, expected in zip(patterns.tolist(), finite.tolist(), strict=True):
        ones[17] = bits
        assert _all_finite(_ENUM_BY_TORCH[dtype], ones.numpy().tobytes()) == expected, hex(bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extreme_finite_values_pass(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([[info.max, -info.max, info.tiny, -0.0]], dtype=dtype)
    validate_batch(batch_of(x))


def test_a_fleets_widths_are_checked_per_model_and_are_its_allow_list():
    widths = {"tiny": 16, "wide": 48}
    validate_batch(batch_of(torch.zeros(2, 16).half()), expected_width=widths)
    validate_batch(batch_of(torch.zeros(2, 48).half(), model="wide"), expected_width=widths)
    with pytest.raises(
        BatchValidationError, match="width: got 48, the collector expects 16 for tiny"
    ):
        validate_batch(batch_of(torch.zeros(2, 48).half()), expected_width=widths)
    with pytest.raises(BatchValidationError, match="model: unknown model 'other'"):
        validate_batch(batch_of(torch.zeros(2, 16).half(), model="other"), expected_width=widths)


def test_the_engine_travels_and_an_older_sender_may_leave_it_empty():
    x = torch.randn(2, 8)
    assert batch_of(x).engine == "hf"  # make_batch's default: the transformers replica
    for engine in ("vllm", ""):
        b = pb.ActivationBatch.FromString(batch_of(x, engine=engine).SerializeToString())
        validate_batch(b, expected_width=8)
        assert b.engine == engine


def verdict(**overrides) -> pb.Verdict:
    fields = dict(request_id="chatcmpl-1", tag="misalignment", score=0.8, threshold=0.7,
                  flagged=True, action="blocked", attempt=0, probe="sae-1/misalignment/residual",
                  ts_unix_nanos=10)  # fmt: skip
    return pb.Verdict(**{**fields, **overrides})


def verdict_batch(*verdicts) -> pb.ActivationBatch:
    return pb.ActivationBatch(replica_id="rep", seq=1, model="tiny", model_version="v1",
                              engine="hf", verdicts=list(verdicts))  # fmt: skip


def test_a_batch_of_verdicts_only_is_valid_and_each_bad_verdict_field_is_named():
    validate_batch(verdict_batch(verdict(), verdict(action="none", flagged=False)))
    validate_batch(batch_of(torch.zeros(2, 4), verdicts=[verdict()]))  # both together
    with pytest.raises(BatchValidationError, match="rows"):
        validate_batch(verdict_batch())  # neither vectors nor verdicts
    for bad, field in [
        (verdict(action="dropped"), "verdicts[0].action"),
        (verdict(score=1.5), "verdicts[0].score"),
        (verdict(score=float("nan")), "verdicts[0].score"),
        (verdict(threshold=-0.1), "verdicts[0].threshold"),
        (verdict(tag=""), "verdicts[0].tag"),
        (verdict(request_id="a b"), "verdicts[0].request_id"),
        (verdict(probe="x" * 300), "verdicts[0].probe"),
        (verdict(attempt=2), "verdicts[0].attempt"),
        (verdict(ts_unix_nanos=0), "verdicts[0].ts_unix_nanos"),
    ]:
        with pytest.raises(BatchValidationError) as err:
            validate_batch(verdict_batch(bad))
        assert err.value.field == field
    with pytest.raises(BatchValidationError) as err:
        validate_batch(verdict_batch(*[verdict()] * 4097))
    assert err.value.field == "verdicts"
    stray = verdict_batch(verdict())
    stray.token_pos.append(3)  # per-row metadata without rows
    with pytest.raises(BatchValidationError) as err:
        validate_batch(stray)
    assert err.value.field == "token_pos"
