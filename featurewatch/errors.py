"""Named exceptions for featurewatch, so callers can catch what they can handle, and the
bounds every parse of outside input keeps (sizes, nesting)."""

import json


class FeaturewatchError(Exception):
    """Base class of every error featurewatch raises on purpose."""

    exit_code = 1  # what the command line exits with when this error ends a command


class UsageError(FeaturewatchError):
    """A command-line argument is invalid; the message names the option."""

    exit_code = 2


class ConfigError(FeaturewatchError):
    """A configuration file or value is invalid; the message names the field."""


class ModelPathError(FeaturewatchError):
    """A model path does not exist or does not hold a transformers causal LM."""


class SAEFormatError(FeaturewatchError):
    """An SAE folder is missing a file or tensor, or disagrees with its cfg.json."""


class BatchValidationError(FeaturewatchError):
    """An incoming ActivationBatch is malformed. `field` names the offending field."""

    def __init__(self, field: str, message: str, *, too_large: bool = False):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.too_large = too_large


class SpoolError(FeaturewatchError):
    """A spool segment is unreadable or the spool is closed."""


class CatalogError(FeaturewatchError):
    """The DuckDB catalog refused a statement or is in an unexpected state."""


class TranscriptError(FeaturewatchError):
    """A JSONL file of chat transcripts has malformed lines; the message names them."""


# Limits on every file featurewatch parses from outside (configs, policies, SAE cfg.json,
# transcript lines): a size checked before reading, and a nesting depth.
MAX_FILE_BYTES = 1 << 20
MAX_NESTING = 32


def nesting(value) -> int:
    """How deeply lists and mappings nest in a parsed value (a scalar: 0), without
    recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(text: str | bytes, max_depth: int = MAX_NESTING):
    """json.loads within a nesting depth; ValueError (JSONDecodeError for bad syntax)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {max_depth} deep") from None
    if nesting(value) > max_depth:
        raise ValueError(f"nested more than {max_depth} deep")
    return value
