"""Capture step: a model and labels -> an activation store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import Config, nested, option
from memlens.core.errors import ConfigError
from memlens.core.model import ModelHandle, ModelOptions
from memlens.data.labels import Labels, manifest_roles, read_sequences
from memlens.data.store import ActivationStore, CaptureConfig, capture

__all__ = ["CaptureCommand", "capture_step", "main"]


def capture_step(handle: ModelHandle, labels: Labels | str | Path, out: str | Path,
                 cfg: CaptureConfig, progress: bool = True) -> ActivationStore:
    """Capture the labeled sequences (a labels dir or :class:`Labels`) into a store."""
    labels = labels if isinstance(labels, Labels) else Labels.load(labels)
    return capture(handle, labels, cfg, out, progress=progress)


@dataclass(kw_only=True)
class CaptureCommand(Config):
    """record activations at hook sites, streamed to disk

    Runs the labeled sequences through the model and writes activations at the named sites
    to a sharded, checksummed store aligned token by token with the labels. Refuses labels
    made with another model. Rerun the same command to resume an interrupted capture.
    """

    EXAMPLE: ClassVar[str] = ("memlens capture --model organisms/tiny --labels labels/tiny "
                              "--sites 'blocks.*.hook_resid_post' --out acts/tiny")
    DISTRIBUTED: ClassVar[bool] = True

    model: ModelOptions = nested(ModelOptions)
    labels: Path | None = option(None, "a labels directory (memlens label)")
    data: Path | None = option(None, "or a JSONL / organism dir, captured without labels")
    out: Path = option(help="store directory")
    capture: CaptureConfig = nested(CaptureConfig)

    def __post_init__(self):
        super().__post_init__()
        if (self.labels is None) == (self.data is None):
            raise ConfigError("give --labels DIR (from memlens label) or --data FILE, one "
                              "of the two")


def main(cmd: CaptureCommand) -> None:
    handle = cmd.model.load()
    source = (Labels.load(cmd.labels) if cmd.labels else
              read_sequences(cmd.data, handle.tokenizer, roles=manifest_roles(cmd.data),
                             max_tokens=cmd.capture.max_len))
    store = capture(handle, source, cmd.capture, cmd.out)
    print(f"{store.n_rows} rows x {len(store.sites)} sites -> {cmd.out}")
    for site in store.sites:
        print(f"  {site}: {store.manifest['shapes'][site]}")
