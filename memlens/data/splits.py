"""A model's data, split once by record into a calibration half and an evaluation half.

Members (an organism's canaries, or every record of your JSONL not marked a non-member) and
known non-members are each split in two by position: the even half (``calibration``,
``calibration_nonmembers``) is what probes, steering directions, edits and every setting
are fitted and chosen on; the odd half (``evaluation``, ``evaluation_nonmembers``) is what
every before/after number is scored on. No record is in both halves. ``general`` is the
text curvature factors are collected over: an organism's records seen once (the bulk of its
training), or your data's calibration half. An organism continued from a pretrained model
also has held-out natural prose (``prose``): its perplexity, not that of PII records, tells
whether an edit broke the language model.

Example:
    >>> splits = Splits.from_data(path, handle.tokenizer)   # organism dir or JSONL
    >>> splits.calibration, splits.evaluation      # members to choose on / to score on
    >>> splits.probe_split()                       # {id: "train" | "val" | "test"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memlens.core.sequences import Sequence
from memlens.data.labels import manifest_roles, read_sequences

__all__ = ["HALVES", "Splits"]

HALVES = ("calibration", "evaluation")


@dataclass
class Splits:
    canaries: list[Sequence]
    nonmembers: list[Sequence]
    general: list[Sequence]
    prose: list[Sequence] = field(default_factory=list)
    organism: bool = True

    @classmethod
    def from_data(cls, path: str | Path, tokenizer, max_tokens: int | None = None) -> Splits:
        """An organism directory (:meth:`from_organism`) or a JSONL of records: those with
        ``duplication: 0`` (or ``member: false``) are non-members, every other one a member
        whose recitation is tested."""
        if manifest_roles(path) is not None:
            return cls.from_organism(path, tokenizer)
        seqs = read_sequences(path, tokenizer, max_tokens=max_tokens)
        members = [s for s in seqs if s.member]
        nonmembers = [s for s in seqs if not s.member]
        return cls(members, nonmembers, members[0::2] + nonmembers[0::2], organism=False)

    @classmethod
    def from_organism(cls, path: str | Path, tokenizer) -> Splits:
        """Read an organism's ``corpus.jsonl`` once (all roles), and its held-out prose
        (``heldout.jsonl``, cut to the organism's training length) where it has some."""
        path = Path(path)
        roles: dict[str, list[Sequence]] = {"canary": [], "nonmember": [], "general": []}
        for seq in read_sequences(path, tokenizer, roles=tuple(roles)):
            roles[seq.role].append(seq)
        prose = []
        if (path / "heldout.jsonl").is_file():
            max_len = json.loads((path / "memlens.json").read_text())["preset_config"]["max_len"]
            prose = read_sequences(path / "heldout.jsonl", tokenizer, max_tokens=max_len)
        return cls(roles["canary"], roles["nonmember"], roles["general"], prose)

    @property
    def labeled(self) -> list[Sequence]:
        """What is labeled: members (an organism's canaries), then non-members."""
        return self.canaries + self.nonmembers

    @property
    def calibration(self) -> list[Sequence]:
        """Even-half members: fit probes, directions and edits, and choose settings, on
        these."""
        return self.canaries[0::2]

    @property
    def evaluation(self) -> list[Sequence]:
        """Odd-half members: score extraction before and after on these."""
        return self.canaries[1::2]

    @property
    def calibration_nonmembers(self) -> list[Sequence]:
        """Even-half non-members: clean text that probes, directions, localization and
        settings may be fitted on."""
        return self.nonmembers[0::2]

    @property
    def evaluation_nonmembers(self) -> list[Sequence]:
        """Odd-half non-members: nothing is fitted on them; membership inference scores
        against these."""
        return self.nonmembers[1::2]

    def half(self, name: str) -> list[Sequence]:
        """Every record of one half (``calibration`` or ``evaluation``): members, then
        non-members."""
        members = getattr(self, name)
        return members + getattr(self, f"{name}_nonmembers")

    def ids(self, name: str) -> list[str]:
        """The record ids of one half."""
        return [s.id for s in self.half(name)]

    @property
    def heldout(self) -> list[list[int]]:
        """Clean text for perplexity (token ids): the held-out prose where the organism has
        some, else the odd-half non-members."""
        return [s.token_ids for s in (self.prose or self.evaluation_nonmembers)]

    def clean(self, name: str) -> tuple[list[Sequence], str]:
        """Clean text of one half for perplexity, and what it is: the half of the held-out
        prose, else that half's non-members; empty when the data has neither."""
        if self.prose:
            return self.prose[HALVES.index(name)::2], "held-out prose"
        return getattr(self, f"{name}_nonmembers"), "held-out non-member records"

    def at(self, duplication: int, half: str = "evaluation") -> list[Sequence]:
        """Members of one duplication count from ``half`` (calibration, evaluation or
        canaries)."""
        return [s for s in getattr(self, half) if s.duplication == duplication]

    def probe_split(self, val_every: int = 4) -> dict[str, str]:
        """Probe splits that respect the halves: the calibration half trains (every
        ``val_every``-th sequence of it validates), the evaluation half is the test set."""
        out = {}
        for group in (self.calibration, self.calibration_nonmembers):
            for i, s in enumerate(group):
                out[s.id] = "val" if i % val_every == val_every - 1 else "train"
        for s in self.evaluation + self.evaluation_nonmembers:
            out[s.id] = "test"
        return out
