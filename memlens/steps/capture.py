"""Capture step: a model and labels -> an activation store."""

from __future__ import annotations

from pathlib import Path

from memlens.core.model import ModelHandle
from memlens.data.labels import (
    Labels,
)
from memlens.data.store import ActivationStore, CaptureConfig, capture

__all__ = ["capture_step"]


def capture_step(handle: ModelHandle, labels: Labels | str | Path, out: str | Path,
                 cfg: CaptureConfig, progress: bool = True) -> ActivationStore:
    """Capture the labeled sequences (a labels dir or :class:`Labels`) into a store."""
    labels = labels if isinstance(labels, Labels) else Labels.load(labels)
    return capture(handle, labels, cfg, out, progress=progress)
