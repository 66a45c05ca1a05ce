"""Errors that mean the user's input is wrong, not that memlens is.

The command line prints a :class:`UserError` as one line and exits 2; any other exception
keeps its traceback. Each subclass is also a ``ValueError`` (or ``FileNotFoundError``), so
code that caught those before still does.
"""

from __future__ import annotations

__all__ = ["ArtifactMismatch", "ConfigError", "DataError", "MissingArtifactError", "ModelLoadError",
           "UserError", "check_keys"]


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


def check_keys(given, valid, where: str) -> None:
    """Refuse a key of ``given`` that is not in ``valid``, in one line naming the key, where
    it stands (``"section [probe] of probes.toml"``) and the nearest valid key.

    Example:
        >>> check_keys({"positiv": [...]}, ["positive", "negative"], "[probe] of my.toml")
        ConfigError: unknown key 'positiv' in [probe] of my.toml; did you mean 'positive'?
        (valid: negative, positive)
    """
    import difflib

    valid = sorted(valid)
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"unknown key {key!r} in {where}; {hint}(valid: "
                              f"{', '.join(valid)})")
