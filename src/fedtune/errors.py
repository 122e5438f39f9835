"""User-facing errors: each one is printed as a single line by the CLI, without a traceback."""


class FedtuneError(Exception):
    """Base class for errors caused by user input (config, data, messages)."""


class ConfigError(FedtuneError):
    """A config key, type or value is invalid."""


class DataError(FedtuneError):
    """A dataset file, column, label or partition is invalid."""


class ModelError(FedtuneError):
    """A model cannot be found or loaded."""


class MessageError(FedtuneError):
    """A message could not be decoded (truncated, corrupted, oversized, wrong schema)."""
