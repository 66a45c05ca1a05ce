"""An organism's sequences, split once for honest before/after scores.

Canaries (members planted 1-100 times) and non-members are each split in two by position:
the even half (``aim``, ``aim_nonmembers``) is what probes, steering directions and edits are
fitted on, the odd half (``evaluation``, ``heldout``) is what every before/after number is
scored on. ``general`` holds the records seen once (the bulk of training: K-FAC factors, the
generic PII vocabulary). An organism continued from a pretrained model also has held-out
natural prose (``prose``): its perplexity, not that of PII records, tells whether an edit
broke the language model.

Example:
    >>> splits = Splits.from_organism(path, handle.tokenizer)
    >>> splits.aim, splits.evaluation              # canaries to fit on / to score on
    >>> splits.probe_split()                       # {id: "train" | "val" | "test"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memlens.core.sequences import Sequence
from memlens.data.labels import read_sequences

__all__ = ["Splits"]


@dataclass
class Splits:
    canaries: list[Sequence]
    nonmembers: list[Sequence]
    general: list[Sequence]
    prose: list[Sequence] = field(default_factory=list)

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
        """Even-half non-members: clean text that probes, directions and localization may
        be fitted on."""
        return self.nonmembers[0::2]

    @property
    def evaluation_nonmembers(self) -> list[Sequence]:
        """Odd-half non-members: nothing is fitted on them; membership inference scores
        against these."""
        return self.nonmembers[1::2]

    @property
    def heldout(self) -> list[list[int]]:
        """Clean text for perplexity (token ids): the held-out prose where the organism has
        some, else the odd-half non-members."""
        return [s.token_ids for s in (self.prose or self.evaluation_nonmembers)]

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
        for s in self.evaluation + self.evaluation_nonmembers:
            out[s.id] = "test"
        return out

