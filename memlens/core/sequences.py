"""The unit every step works on: one token sequence, its membership and its PII spans.

Duplication says how often a sequence was in the training data: ``0`` marks a non-member,
``k >= 1`` a member seen ``k`` times, and ``None`` an unknown count. The one rule for unknown
duplication, used by every table and metric in memlens:

- it counts as a **member** (data you bring is data the model was trained on, unless you say
  ``duplication: 0`` or ``member: false``), so its PII tokens can be labelled ``memorized``;
- by-duplication tables report it under the key ``"unknown"`` (never under ``"0"``, never
  dropped);
- membership AUROCs leave it out: they need known members and non-members.

Example:
    >>> seq = Sequence("doc-1", [0, 17, 42], duplication=None)
    >>> seq.member, duplication_key(seq.duplication)
    (True, 'unknown')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UNKNOWN", "PiiSpan", "Sequence", "duplication_key", "pii_field", "pii_token_mask",
           "sort_keys"]

UNKNOWN = "unknown"


@dataclass(frozen=True)
class PiiSpan:
    """A PII value at characters ``[start, end)`` of a record's text."""

    field: str
    start: int
    end: int


@dataclass
class Sequence:
    """One sequence: token ids, and where known its text, duplication, PII spans, the
    character offsets of each token in the text, and its role in an organism's corpus
    (``general``, ``canary``, ``nonmember``)."""

    id: str
    token_ids: list[int]
    text: str | None = None
    duplication: int | None = None
    spans: list[PiiSpan] | None = None
    offsets: list[tuple[int, int]] | None = None
    role: str | None = None

    @property
    def member(self) -> bool:
        """Known non-members (duplication 0) are not members; everything else is."""
        return self.duplication != 0


def duplication_key(duplication: int | None) -> str:
    """The key of a duplication count in by-duplication tables: ``"5"``, or ``"unknown"``."""
    return UNKNOWN if duplication is None else str(int(duplication))


def sort_keys(keys) -> list[str]:
    """By-duplication keys in order: counts ascending, then ``"unknown"``."""
    return sorted(keys, key=lambda k: (k == UNKNOWN, int(k) if k != UNKNOWN else 0))


def pii_token_mask(offsets: list[tuple[int, int]], spans: list[PiiSpan]) -> list[bool]:
    """True for each token whose characters overlap a PII span."""
    return [any(s < sp.end and e > sp.start for sp in spans) and e > s for s, e in offsets]


def pii_field(seq: Sequence, pos: int) -> str | None:
    """The PII field token ``pos`` of ``seq`` lies in, or None (needs offsets and spans)."""
    s, e = seq.offsets[pos]
    for sp in seq.spans:
        if s < sp.end and e > sp.start and e > s:
            return sp.field
    return None
