"""An organism's sequences, split once for honest before/after scores.

Canaries (members planted 1-100 times) and non-members are each split in two by position:
the even half (``aim``, ``aim_nonmembers``) is what probes, steering directions and edits are
fitted on, the odd half (``evaluation``, ``heldout``) is what every before/after number is
scored on. ``general`` holds the records seen once (the bulk of training: K-FAC factors, the
generic PII vocabulary).

Example:
    >>> splits = Splits.from_organism(path, handle.tokenizer)
    >>> splits.aim, splits.evaluation              # canaries to fit on / to score on
    >>> splits.probe_split()                       # {id: "train" | "val" | "test"}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memlens.core.sequences import Sequence
from memlens.labels import read_sequences


@dataclass
class Splits:
    canaries: list[Sequence]
    nonmembers: list[Sequence]
    general: list[Sequence]

    @classmethod
    def from_organism(cls, path: str | Path, tokenizer) -> Splits:
        """Read an organism's ``corpus.jsonl`` once (all roles)."""
        roles: dict[str, list[Sequence]] = {"canary": [], "nonmember": [], "general": []}
        for seq in read_sequences(path, tokenizer, roles=tuple(roles)):
            roles[seq.role].append(seq)
        return cls(roles["canary"], roles["nonmember"], roles["general"])

    @property
    def labeled(self) -> list[Sequence]:
        """What ``memlens label`` reads from an organism: canaries, then non-members."""
        return self.canaries + self.nonmembers

    @property
    def aim(self) -> list[Sequence]:
        """Even-half canaries: fit probes, directions and edits on these."""
        return self.canaries[0::2]

    @property
    def evaluation(self) -> list[Sequence]:
        """Odd-half canaries: score extraction before and after on these."""
        return self.canaries[1::2]

    @property
    def aim_nonmembers(self) -> list[Sequence]:
        return self.nonmembers[0::2]

    @property
    def heldout(self) -> list[list[int]]:
        """Odd-half non-members' token ids: clean text for perplexity."""
        return [s.token_ids for s in self.nonmembers[1::2]]

    def at(self, duplication: int, half: str = "evaluation") -> list[Sequence]:
        """Canaries of one duplication count from ``half`` (aim, evaluation or canaries)."""
        return [s for s in getattr(self, half) if s.duplication == duplication]

    def probe_split(self, val_every: int = 4) -> dict[str, str]:
        """Probe splits that respect the halves: the even half trains (every
        ``val_every``-th sequence of it validates), the odd half is the test set."""
        out = {}
        for group in (self.aim, self.aim_nonmembers):
            for i, s in enumerate(group):
                out[s.id] = "val" if i % val_every == val_every - 1 else "train"
        for s in self.evaluation + self.nonmembers[1::2]:
            out[s.id] = "test"
        return out

