"""``memlens demo``: :func:`memlens.steps.run.run` on the embedded organism.

The demo trains (or reuses) an organism preset, then runs the whole chain on it with the
organism's own corpus as the data: every setting chosen on the calibration half of the
canaries, every number scored on the evaluation half, and the audit against the organism
trained again without the forget set.

Example:
    >>> summary = run_demo("memlens-demo")    # OUT/report.html, OUT/summary.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import option
from memlens.data.organism import organism_path
from memlens.steps.chain import RunConfig
from memlens.steps.organism import PathCommand
from memlens.steps.run import run

__all__ = ["DemoCommand", "main", "run_demo"]


def run_demo(out: str | Path = "memlens-demo", preset: str = "small", arch: str = "llama",
             seed: int = 0, fresh: bool = False, progress: bool = True,
             config: RunConfig | None = None) -> dict:
    """Run the chain on the organism (reusing cached steps unless ``fresh``), write
    OUT/report.html and OUT/summary.json; returns the summary."""
    path = organism_path(preset, arch, seed, progress=progress)
    return run(path, path, out, config, fresh=fresh, progress=progress,
               title="memlens demo report")


@dataclass(kw_only=True)
class DemoCommand(PathCommand):
    """run the whole chain on the organism; write a report

    Trains (or reuses) the organism, then runs `memlens run` on it with its own corpus:
    labels, probes, K-FAC edit, localization and ablation, steering, LayerNorm, the
    forgetting audit, each removal's setting chosen on the calibration half of the canaries
    and scored on the evaluation half. Out: OUT/report.html (one interactive page, works
    offline), OUT/summary.json, and each step's artifact. Steps are cached by their inputs'
    identities: a second run takes seconds.
    """

    EXAMPLE: ClassVar[str] = "memlens demo --out memlens-demo"

    out: Path = option(Path("memlens-demo"), "output directory")
    fresh: bool = option(False, "rerun every step, ignore the cache")


def main(cmd: DemoCommand) -> None:
    run_demo(cmd.out, preset=cmd.preset, arch=cmd.arch, seed=cmd.seed, fresh=cmd.fresh)
