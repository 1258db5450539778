"""Every kind of file featurewatch reads from outside (configs, policies, SAE folders,
transcript JSONL) is parsed within limits and refused by name: no other exception, no
allocation sized by the file's claims, no parse that takes minutes (issue 24, point 5).
A hypothesis test per file kind feeds it arbitrary content."""

import contextlib
import json
import os
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurewatch.analysis.transcripts import parse_lines
from featurewatch.config import load_config
from featurewatch.errors import (
    MAX_FILE_BYTES,
    ConfigError,
    SAEFormatError,
    TranscriptError,
    parse_json,
)
from featurewatch.platform.control.policies import load_policies
from featurewatch.sae import build, load

POLICY = {"policies": [{
    "id": "p1", "condition": {"tag": "misalignment", "statistic": "rate_ratio",
                              "window": "1h", "baseline": "24h", "threshold": 2.0},
    "actions": [{"type": "alert", "url": "http://127.0.0.1:9/x"}]}]}  # fmt: skip
FAST = settings(max_examples=int(os.environ.get("FW_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_non_finite_threshold_is_refused(tmp_path, value):
    text = yaml.safe_dump(POLICY).replace("threshold: 2.0", f"threshold: {value}")
    with pytest.raises(ConfigError, match="condition.threshold"):
        load_policies(write(tmp_path, "p.yaml", text))
    with pytest.raises(ConfigError, match="collector.segment_max_age_s"):
        load_config(write(tmp_path, "c.yaml", f"collector: {{segment_max_age_s: {value}}}"))


def test_yaml_bombs_and_huge_files_are_refused_at_once(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]  # 9**9 strings once expanded
    for reader, kind in ((load_policies, "policy file"), (load_config, "config file")):
        started = time.perf_counter()
        with pytest.raises(ConfigError, match="aliases .* are not allowed"):
            reader(write(tmp_path, "bomb.yaml", "\n".join(lines)))
        with pytest.raises(ConfigError, match="nested more than 32 deep"):
            reader(write(tmp_path, "deep.yaml", "a: " + "[" * 200 + "]" * 200))
        big = write(tmp_path, "big.yaml", "policies:\n" + "  - x\n" * (MAX_FILE_BYTES // 4))
        with pytest.raises(ConfigError, match=f"{kind} .* bytes, more than the"):
            reader(big)
        assert time.perf_counter() - started < 2.0


def test_a_deeply_nested_transcript_line_is_one_bad_line(capsys):
    lines = ['{"prompt": "hi", "response": "hello"}', "[" * 40_000 + "]" * 40_000,
             '{"prompt": ' + "[" * 40 + "]" * 40 + ', "response": "x"}',
             '{"prompt": "bye", "response": "see you"}']  # fmt: skip
    kept = parse_lines(lines, "chats.jsonl", on_error="skip")
    assert [t.line for t in kept] == [1, 4]
    err = capsys.readouterr().err
    assert "chats.jsonl:2: nested more than 32 deep" in err and "chats.jsonl:3:" in err
    with pytest.raises(TranscriptError, match="2 malformed"):
        parse_lines(lines, "chats.jsonl")


def test_an_sae_whose_config_claims_huge_sizes_is_refused_before_any_allocation(tmp_path):
    sae = build("topk", 16, 32, k=4)
    sae.save(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_sae"] = 4_000_000_000  # 256 GB of float32 if allocated
    cfg_path.write_text(json.dumps(cfg))
    started = time.perf_counter()
    with pytest.raises(SAEFormatError, match=r"W_enc has shape \(16, 32\), cfg.json implies"):
        load(tmp_path / "sae")
    assert time.perf_counter() - started < 2.0
    cfg_path.write_text('{"d_in": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(SAEFormatError, match="nested more than 32 deep"):
        load(tmp_path / "sae")


@pytest.mark.parametrize("cfg", [{"architecture": []}, {"architecture": "topk", "d_in": 8,
                                  "d_sae": 16, "k": 2, "dtype": ["float32"]},
                                 {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2,
                                  "metadata": [1]}])  # fmt: skip
def test_sae_cfg_values_of_the_wrong_type_are_named(tmp_path, cfg):
    """Found by the hypothesis test below: a list where a name goes raised TypeError."""
    build("topk", 8, 16, k=2).save(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="architecture|dtype|metadata"):
        load(tmp_path)


def test_parse_json_bounds_depth():
    assert parse_json('{"a": [[1]]}') == {"a": [[1]]}
    with pytest.raises(ValueError, match="nested more than 2 deep"):
        parse_json("[[[1]]]", max_depth=2)


@FAST
@given(st.one_of(st.text(max_size=400), st.binary(max_size=400)))
def test_any_config_or_policy_file_is_loaded_or_refused_by_name(tmp_path, content):
    path = write(tmp_path, "any.yaml", content)
    for reader in (load_config, load_policies):
        with contextlib.suppress(ConfigError):
            reader(path)


@FAST
@given(st.lists(st.one_of(st.text(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "response", "messages", "role", "content", "id", "label"]),
        inner, max_size=4),
    max_leaves=20).map(json.dumps)), max_size=6))  # fmt: skip
def test_any_transcript_lines_are_parsed_or_skipped_by_number(lines):
    try:
        kept = parse_lines(lines, "any.jsonl", on_error="skip")
    except TranscriptError:
        return  # no transcript at all
    assert all(1 <= t.line <= len(lines) for t in kept)


@FAST
@given(st.dictionaries(
    st.sampled_from(["architecture", "d_in", "d_sae", "k", "dtype", "apply_b_dec_to_input",
                     "normalize_activations", "metadata"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True),
              st.sampled_from(["topk", "relu", "jumprelu", "float32", "bfloat16", "none"]),
              st.lists(st.integers(), max_size=2)),
))  # fmt: skip
def test_any_sae_cfg_json_is_loaded_or_refused_by_name(tmp_path_factory, cfg):
    folder = tmp_path_factory.mktemp("sae")
    torch.manual_seed(0)
    build("topk", 8, 16, k=2).save(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    try:
        loaded = load(folder)
    except SAEFormatError:
        return
    assert (loaded.d_in, loaded.d_sae) == (8, 16)
