"""Errors that mean the user's input is wrong, not that memlens is.

The command line prints a :class:`UserError` as one line and exits 2; any other exception
keeps its traceback. Each subclass is also a ``ValueError`` (or ``FileNotFoundError``), so
code that caught those before still does.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a value, a file or a path. The message names it and says how to fix it."""


class ConfigError(UserError):
    """A setting out of range or of the wrong kind."""


class DataError(UserError):
    """Malformed input data; the message names the file and line."""


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


class ArtifactMismatch(UserError):
    """An artifact was made from another model or corpus than the one it is used with."""


class MissingArtifactError(UserError, FileNotFoundError):
    """An input artifact (labels, store, probe, factors...) is not where it was named."""
