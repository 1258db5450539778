"""Scoring a model version on its live traffic from the lake (what a canary is judged by),
against values worked out by hand."""

import math

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from featurewatch.analysis.scoring import (
    Probe,
    generation_prompt_ids,
    live_scores,
    response_start,
)
from featurewatch.capture.generation import prompt_text
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.lake import write_segment
from tests.unit.lake_helpers import T0, segment

SUFFIX = [1, 2]  # the generation prompt's tokens in these hand-made requests


@pytest.fixture
def catalog(tmp_path):
    with Catalog(tmp_path / "c.duckdb", tmp_path / "lake") as cat:
        yield cat


def commit_request(cat, name, token_ids, fires, *, model_version="cand", positions=None):
    """One request's captured tokens (ids in order) and feature values by position."""
    tokens, features = segment(T0, len(token_ids), fires, model_version, request=name)
    tokens = tokens.set_column(
        tokens.schema.get_field_index("token_id"), "token_id", pa.array(token_ids, pa.int32())
    )
    if positions is not None:
        index = tokens.schema.get_field_index("token_pos")
        tokens = tokens.set_column(index, "token_pos", pa.array(positions, pa.int32()))
    files = write_segment(cat.lake, tokens, features, f"{name}__sae1")
    cat.commit_segment(name, "sae1", files, tokens=tokens.num_rows, feature_rows=len(features))


def score(cat, pooling, probe=None, version="cand"):
    return live_scores(
        cat, version, sae_version="sae1", layer=1, feature_ids=[10, 11], suffix=SUFFIX,
        since=T0, pooling=pooling, probe=probe,
    )  # fmt: skip


def test_answers_are_found_after_the_generation_prompt_and_pooled_by_hand(catalog):
    # Positions 0-2 are the prompt (ending in the generation prompt 1, 2), 3-5 the answer.
    # Feature 10 fires 5.0 in the prompt (not counted) and 2.0 at position 4; feature 11
    # fires 1.0 at position 3 and 3.0 at position 5.
    commit_request(
        catalog, "a", [5, 1, 2, 9, 9, 9], {10: [5.0, 0, 0, 0, 2.0], 11: [0, 0, 0, 1.0, 0, 3.0]}
    )
    # Left out: no generation prompt captured; a gap in positions; another version.
    commit_request(catalog, "b", [5, 5, 9], {10: [9.0, 9.0, 9.0]})
    commit_request(catalog, "c", [1, 2, 9], {10: [9.0] * 3}, positions=[0, 1, 5])
    commit_request(catalog, "d", [1, 2, 9], {10: [9.0] * 3}, model_version="base")

    by_max = score(catalog, "max")
    assert (by_max["requests"], by_max["tokens"]) == (1, 3)
    # max pooling: the group's mean of each feature's max over the answer: (2 + 3) / 2.
    assert by_max["mean_score"] == pytest.approx(2.5)
    # mean pooling: f10 2/3, f11 4/3 (the mean over all three answer tokens): mean 1.0.
    assert score(catalog, "mean")["mean_score"] == pytest.approx(1.0)
    # A probe that reads only f11's max (its ids in another order than the group's).
    probe = Probe(
        tag="t", sae_version="sae1", feature_ids=[11, 10], center=[0.0] * 4, scale=[1.0] * 4,
        coef=[1.0, 0.0, 0.0, 0.0], intercept=-1.0, fitted_on={},
    )  # fmt: skip
    assert score(catalog, "probe", probe)["mean_score"] == pytest.approx(1 / (1 + math.exp(-2)))
    assert score(catalog, "max", version="base")["mean_score"] == pytest.approx(4.5)
    assert score(catalog, "max", version="none") == {
        "model_version": "none",
        "requests": 0,
        "mean_score": None,
    }


def test_a_request_with_only_its_prompt_so_far_is_not_scored(catalog):
    commit_request(catalog, "a", [5, 1, 2], {10: [1.0, 1.0, 1.0]})
    assert score(catalog, "max")["requests"] == 0


@pytest.mark.parametrize(
    ("ids", "expected"),
    [([1, 2, 3], 2), ([1, 2, 1, 2], 4), ([1, 3, 2], None), ([], None), ([2, 1], None)],
)
def test_response_start_is_after_the_last_generation_prompt(ids, expected):
    assert response_start(ids, [1, 2]) == expected


def test_generation_prompt_ids_are_what_the_template_adds(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    suffix = generation_prompt_ids(tokenizer)
    chat = [{"role": "user", "content": "How do plants grow?"}]
    ids = tokenizer(prompt_text(tokenizer, chat), add_special_tokens=False)["input_ids"]
    assert suffix and ids[-len(suffix) :] == suffix
    assert tokenizer.decode(suffix).strip().startswith("<|im_start|>assistant")
    # A model without a chat template prompts with role-prefixed lines.
    tokenizer.chat_template = None
    assert tokenizer.decode(generation_prompt_ids(tokenizer)) == "\nassistant:"
