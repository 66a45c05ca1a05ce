"""Organism step: train (or find) the memorization organism, a small causal LM trained on a
synthetic PII corpus with planted, duplicated canary records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import INDEX, Config, option
from memlens.data.organism import organism_path, train_organism

__all__ = ["PathCommand", "TrainCommand", "path", "train"]


@dataclass(kw_only=True)
class PathCommand(Config):
    """print the cached organism's directory, training it if needed

    The organism lives under ~/.cache/memlens (or $MEMLENS_CACHE), keyed by its settings
    and the training libraries' releases.
    """

    EXAMPLE: ClassVar[str] = "memlens organism path --preset small --arch llama"

    preset: str = option("small", "tiny (~75 s), small (~5 min) or tiny-deep (6 blocks)")
    arch: str = option("llama", "llama, neox, gpt2, opt (Pre-LN) or opt-postln (Post-LN)")
    seed: int = option(0, "training seed", INDEX)


@dataclass(kw_only=True)
class TrainCommand(PathCommand):
    """train an organism into --out

    Out: a Hugging Face model directory (config, safetensors, tokenizer) with corpus.jsonl
    (the ground truth) and memlens.json.
    """

    EXAMPLE: ClassVar[str] = ("memlens organism train --preset tiny --arch llama --out "
                              "organisms/tiny")

    out: Path = option(help="output directory")


def path(cmd: PathCommand) -> None:
    print(organism_path(cmd.preset, cmd.arch, cmd.seed))


def train(cmd: TrainCommand) -> None:
    print(train_organism(cmd.out, cmd.preset, cmd.arch, cmd.seed))
