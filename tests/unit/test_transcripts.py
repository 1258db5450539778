"""Transcript JSONL: both forms, every malformed line reported by number, the bundled
labelled sets and their split."""

import json
import re

import pytest

from featurewatch.analysis.transcripts import (
    DOMAINS,
    bundled,
    held_out,
    parse_lines,
    read_prompts,
    read_transcripts,
)
from featurewatch.errors import TranscriptError

GOOD = [
    json.dumps({"id": "a", "prompt": "Hi?", "response": "Hello.", "label": 0}),
    json.dumps(
        {
            "id": 7,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ],
            "label": 1,
            "source": "kept",
        }
    ),
]


def test_both_forms_parse_and_keep_other_keys():
    first, second = parse_lines(["", *GOOD], "f.jsonl")
    assert (first.line, first.id, first.label) == (2, "a", 0)
    assert first.context == [{"role": "user", "content": "Hi?"}] and first.response == "Hello."
    assert (second.id, second.label, second.extra) == (7, 1, {"source": "kept"})
    assert [m["role"] for m in second.context] == ["system", "user"]


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"prompt": "x"}', "response must be a non-empty string"),
    ('{"prompt": "", "response": "y"}', "prompt must be a non-empty string"),
    ('{"text": "x"}', "needs messages, or prompt and response"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "at least 2"),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
        "last message must be the assistant",
    ),
    (
        '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        "messages[0].role",
    ),
    ('{"prompt": "x", "response": "y", "label": 2}', "label must be 0 or 1"),
    ('{"prompt": "x", "response": "y", "label": true}', "label must be 0 or 1"),
    ('{"prompt": "x", "response": "y", "id": [1]}', "id must be"),
    ('{"prompt": "x", "response": "y", "messages": []}', "not both"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_each_malformed_line_is_refused_by_number(line, message):
    with pytest.raises(TranscriptError) as err:
        parse_lines([GOOD[0], line], "in.jsonl")
    assert re.search(rf"in\.jsonl:2: .*{re.escape(message)}", str(err.value))


def test_skip_reports_every_bad_line_and_keeps_the_rest(capsys):
    lines = [GOOD[0], BAD[0][0], GOOD[1], BAD[2][0]]
    kept = parse_lines(lines, "in.jsonl", on_error="skip")
    assert [t.line for t in kept] == [1, 3]
    err = capsys.readouterr().err
    assert "in.jsonl:2: not valid JSON" in err and "in.jsonl:4: response" in err


def test_labels_required_for_fitting_and_files_checked(tmp_path):
    with pytest.raises(TranscriptError, match="1: label"):
        parse_lines(['{"prompt": "x", "response": "y"}'], "f", require_label=True)
    with pytest.raises(TranscriptError, match="not found"):
        read_transcripts(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TranscriptError, match="not UTF-8"):
        read_transcripts(tmp_path / "bin.jsonl")
    with pytest.raises(TranscriptError, match="no transcripts"):
        parse_lines(["", "  "], "empty")


def test_prompts_for_diffing(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a?"}\n{"messages": [{"role": "user", "content": "b?"}]}\n')
    assert read_prompts(path) == [
        [{"role": "user", "content": "a?"}],
        [{"role": "user", "content": "b?"}],
    ]
    path.write_text('{"prompt": "a?"}\n{"messages": [{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(TranscriptError, match="p.jsonl:2: the last message must be the user"):
        read_prompts(path)
    assert len(read_prompts("bundled:persona")) >= 30
    with pytest.raises(TranscriptError, match="unknown prompt set"):
        read_prompts("bundled:nope")


def test_bundled_sets_and_their_split():
    aligned, misaligned, safe = bundled("aligned"), bundled("misaligned"), bundled("safe")
    assert len(aligned) >= 400 and len(misaligned) >= 400 and len(safe) >= 300
    assert {t.label for t in aligned} == {0} and {t.label for t in misaligned} == {1}
    assert all(t.label is None for t in safe)
    domains = {t.extra["domain"] for t in aligned + misaligned}
    assert domains == set(DOMAINS) and len(domains) >= 8
    assert {t.id for t in bundled("labelled")} == {t.id for t in aligned + misaligned}
    assert len(bundled("labelled")) == len(aligned) + len(misaligned) >= 800
    ids = [t.id for t in aligned + misaligned + safe]
    assert len(ids) == len(set(ids))
    # Every prompt has one aligned and one misaligned answer.
    assert {t.id[:-2] for t in aligned} == {t.id[:-2] for t in misaligned}

    # The split is by prompt: both answers to a prompt fall on the same side.
    train = bundled("misaligned:train") + bundled("aligned:train")
    heldout = bundled("misaligned:heldout") + bundled("aligned:heldout")
    assert len(train) + len(heldout) == len(aligned) + len(misaligned)
    assert not {t.id[:-2] for t in train} & {t.id[:-2] for t in heldout}
    assert 0.2 < len(heldout) / (len(train) + len(heldout)) < 0.4
    assert all(held_out(t.id[:-2]) for t in heldout)

    assert len(read_transcripts("bundled:aligned:train", require_label=True)) == len(
        bundled("aligned:train")
    )
    with pytest.raises(TranscriptError, match="has no labels"):
        read_transcripts("bundled:safe", require_label=True)
    with pytest.raises(TranscriptError, match="unknown bundled set"):
        read_transcripts("bundled:toxic")
