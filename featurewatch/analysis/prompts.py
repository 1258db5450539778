"""The prompt sets bundled with the package (featurewatch/data/*.jsonl)."""

from __future__ import annotations

import json
from importlib import resources

PROMPT_SETS = {"everyday": "prompts_everyday.jsonl", "persona": "prompts_persona.jsonl"}


def load_prompts(name: str) -> list[dict]:
    """Rows of {"id", "prompt"} from a bundled set ('everyday' or 'persona')."""
    if name not in PROMPT_SETS:
        raise KeyError(f"unknown prompt set {name!r}; bundled: {sorted(PROMPT_SETS)}")
    text = resources.files("featurewatch.data").joinpath(PROMPT_SETS[name]).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
