"""Chat transcripts from JSONL files: what discovery and scoring read.

A line is a JSON object in one of two forms:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "response": "..."}

The last message is the assistant response that gets encoded; earlier ones are context.
Other keys are kept: `id` is echoed by scoring, `label` (0 or 1) is what a probe is fitted
on. A malformed line is reported by its line number and then skipped or refused (the
caller chooses), never dropped in silence.

The labelled sets bundled with the package (featurewatch/data/labelled, see the docs)
are named `bundled:aligned`, `bundled:misaligned`, `bundled:labelled` (both) and
`bundled:safe`; a `:train` or `:heldout` suffix picks a split made by a hash of the
prompt id, so the two responses to one prompt always fall on the same side. Every
labelled line names its `domain`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from featurewatch.analysis.prompts import load_prompts
from featurewatch.errors import TranscriptError, parse_json

ROLES = ("system", "user", "assistant")
MAX_CHARS = 100_000
DOMAINS = (
    "everyday",
    "code",
    "ai_persona",
    "sarcasm",
    "harmful_advice",
    "power_seeking",
    "agentic_sabotage",
    "sycophancy",
    "covert_hostility",
)
LABELLED_FILES = tuple(f"{domain}.jsonl" for domain in DOMAINS)
SAFE_FILES = ("safe_a.jsonl", "safe_b.jsonl")
HELD_OUT_FRACTION = 0.3
OnError = Literal["skip", "refuse"]


@dataclass
class Transcript:
    line: int  # 1-based line number in its source
    messages: list[dict]  # ends with the assistant response
    id: str | None = None
    label: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def context(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


def _check_messages(messages, last_role: str = "assistant") -> list[dict]:
    least = 2 if last_role == "assistant" else 1
    if not isinstance(messages, list) or len(messages) < least:
        raise ValueError(f"messages must be a list of at least {least} message(s)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise ValueError(f"messages[{i}] must be an object with role and content")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"messages[{i}].content must be a non-empty string")
    if messages[-1]["role"] != last_role:
        raise ValueError(f"the last message must be the {last_role}'s")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_transcript(text: str, line: int, *, require_label: bool = False) -> Transcript:
    """One JSONL line as a Transcript; ValueError names what is wrong."""
    if len(text) > MAX_CHARS:
        raise ValueError(f"line is longer than {MAX_CHARS} characters")
    try:
        obj = parse_json(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError("must be a JSON object")
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise ValueError("give either messages or prompt/response, not both")
        messages = _check_messages(obj.pop("messages"))
    elif "prompt" in obj or "response" in obj:
        prompt, response = obj.pop("prompt", None), obj.pop("response", None)
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise ValueError("needs messages, or prompt and response")
    ident = obj.pop("id", None)
    if ident is not None and not isinstance(ident, str | int):
        raise ValueError("id must be a string or an integer")
    label = obj.pop("label", None)
    if label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise ValueError("label must be 0 or 1")
    if require_label and label is None:
        raise ValueError("label (0 or 1) is required here")
    return Transcript(line, messages, ident, label, obj)


def parse_lines(
    lines: list[str], source: str, *, on_error: OnError = "refuse", require_label: bool = False
) -> list[Transcript]:
    """Transcripts from JSONL lines (blank lines are allowed). Bad lines are written to
    stderr with their number and skipped, or refused together in one TranscriptError."""
    if on_error not in ("skip", "refuse"):
        raise ValueError(f"on_error must be 'skip' or 'refuse', got {on_error!r}")
    transcripts, problems = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            transcripts.append(parse_transcript(text, number, require_label=require_label))
        except ValueError as err:
            problems.append(f"{source}:{number}: {err}")
    if problems and on_error == "refuse":
        shown = "\n".join(problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise TranscriptError(f"{len(problems)} malformed line(s):\n{shown}{more}")
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not transcripts:
        raise TranscriptError(f"{source}: no transcripts")
    return transcripts


def held_out(prompt_id: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a prompt belongs to the held-out split (a stable hash of its id)."""
    digest = hashlib.sha256(prompt_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _prompt_id(transcript_id: str) -> str:
    # "code-012-a" and "code-012-m" answer the same prompt: split them together.
    return transcript_id.rsplit("-", 1)[0]


def _bundled_lines(name: str) -> list[str]:
    folder = resources.files("featurewatch.data").joinpath("labelled")
    files = SAFE_FILES if name == "safe" else LABELLED_FILES
    lines: list[str] = []
    for filename in files:
        lines += folder.joinpath(filename).read_text().splitlines()
    if name in ("safe", "labelled"):
        return lines
    want = 0 if name == "aligned" else 1
    return [line for line in lines if line.strip() and json.loads(line)["label"] == want]


def bundled(name: str) -> list[Transcript]:
    """A bundled set: `aligned`, `misaligned`, `labelled` or `safe`, optionally
    `:train`/`:heldout`."""
    base, _, split = name.partition(":")
    bases = ("aligned", "misaligned", "labelled", "safe")
    if base not in bases or split not in ("", "train", "heldout"):
        raise TranscriptError(
            f"unknown bundled set {name!r}: use aligned, misaligned, labelled or safe, "
            "optionally with :train or :heldout"
        )
    transcripts = parse_lines(_bundled_lines(base), f"bundled:{base}")
    if split:
        keep_held_out = split == "heldout"
        transcripts = [t for t in transcripts if held_out(_prompt_id(str(t.id))) == keep_held_out]
    return transcripts


def read_transcripts(
    source: str | Path, *, on_error: OnError = "refuse", require_label: bool = False
) -> list[Transcript]:
    """Transcripts from a JSONL file, '-' (stdin) or `bundled:NAME` (see the docstring)."""
    text = str(source)
    if text.startswith("bundled:"):
        transcripts = bundled(text.removeprefix("bundled:"))
        if require_label and any(t.label is None for t in transcripts):
            raise TranscriptError(f"{text} has no labels (use aligned, misaligned or labelled)")
        return transcripts
    if text == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise TranscriptError(f"transcript file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise TranscriptError(f"{path}: not UTF-8 text ({err.reason})") from None
    return parse_lines(lines, text, on_error=on_error, require_label=require_label)


def read_prompts(source: str | Path) -> list[list[dict]]:
    """Prompts for model diffing: `bundled:everyday` or `bundled:persona`, or a JSONL
    file of `{"prompt": ...}` or `{"messages": [...]}` ending with the user's turn."""
    text = str(source)
    if text.startswith("bundled:"):
        try:
            rows = load_prompts(text.removeprefix("bundled:"))
        except KeyError as err:
            raise TranscriptError(str(err.args[0])) from None
        return [[{"role": "user", "content": r["prompt"]}] for r in rows]
    path = Path(source)
    if not path.is_file():
        raise TranscriptError(f"prompt file not found: {path}")
    prompts, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
            if not isinstance(obj, dict):
                raise ValueError("must be a JSON object")
            if "messages" in obj:
                prompts.append(_check_messages(obj["messages"], last_role="user"))
            elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
                prompts.append([{"role": "user", "content": obj["prompt"]}])
            else:
                raise ValueError("needs a non-empty prompt, or messages ending with the user's")
        except ValueError as err:  # JSONDecodeError is a ValueError
            problems.append(f"{path}:{number}: {err}")
    if problems:
        raise TranscriptError(f"{len(problems)} malformed line(s):\n" + "\n".join(problems[:20]))
    if not prompts:
        raise TranscriptError(f"{path}: no prompts")
    return prompts
