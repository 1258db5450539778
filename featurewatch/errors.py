"""Named exceptions for featurewatch, so callers can catch what they can handle."""


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
