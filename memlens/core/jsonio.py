"""Strict JSON for every artifact memlens writes.

Python's ``json`` writes ``NaN`` and ``-Infinity``, which are not JSON: ``JSON.parse``, ``jq``
and most other readers refuse the file. memlens writes through :func:`dumps` and
:func:`write`, which turn a value that is not a finite number into ``null`` (for example
the log-probability of a suffix that sampling can never produce, ``-inf``), numpy and torch
scalars and arrays into plain numbers and lists, a result type into its ``to_json()`` (an
:class:`~memlens.core.metrics.Extraction`), and anything else (a path, a dtype) into its
string.

Example:
    >>> dumps({"p": float("-inf"), "n": np.int64(3)})
    '{"p": null, "n": 3}'
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

__all__ = ["dumps", "plain", "write"]


def plain(obj):
    """``obj`` as JSON's types: dicts (string keys), lists, str, bool, int, finite float or
    None; a non-finite number becomes None."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if callable(getattr(obj, "to_json", None)):  # a result type
        return plain(obj.to_json())
    if hasattr(obj, "tolist") and not isinstance(obj, numbers.Number):  # arrays, tensors
        return plain(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy and torch scalars
        obj = obj.item()
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(obj) else None
    return str(obj)


def dumps(obj, indent: int | None = None) -> str:
    """``obj`` as strict JSON text (see :func:`plain`)."""
    return json.dumps(plain(obj), indent=indent, allow_nan=False)


def write(path: str | Path, obj, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically: a crash leaves the old file or
    the new one, never half of one. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(obj, indent) + "\n")
    os.replace(tmp, path)
    return path
