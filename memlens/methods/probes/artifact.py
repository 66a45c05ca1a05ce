"""A fitted probe: the saved artifact (safetensors + JSON with its identity), its score,
its direction in activation space, and a one-site fit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memlens.core.errors import ConfigError, DataError
from memlens.core.identity import Identity, read_artifact, state_hash, write_artifact
from memlens.core.storage import atomic_dir
from memlens.methods.probes.data import CONFIDENCE, ProbeConfig
from memlens.methods.probes.metrics import best_threshold, class_gap
from memlens.methods.probes.solver import fit_sklearn, standardize

__all__ = ["Probe", "fit_probe"]



@dataclass
class Probe:
    """A fitted probe: ``score(x) = sigmoid(((x - mean) / std) @ weight + bias)``."""

    sites: list[str]
    weight: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray
    threshold: float
    align: str
    metrics: dict = field(default_factory=dict)
    class_gap: float = 0.0   # |mean x of positives - mean x of negatives| on training tokens
    identity: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "+".join(self.sites)

    def score(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Memorization probability for features ``x`` [..., d] (numpy or torch)."""
        if isinstance(x, torch.Tensor):
            p = {k: torch.as_tensor(v, dtype=x.dtype, device=x.device) for k, v in
                 (("w", self.weight), ("m", self.mean), ("s", self.std))}
            return torch.sigmoid(((x - p["m"]) / p["s"]) @ p["w"] + self.bias)
        from scipy.special import expit  # no overflow for large logits

        return expit(((x - self.mean) / self.std) @ self.weight + self.bias)

    def direction(self) -> np.ndarray:
        """Unit vector in activation space along which the memorization logit grows."""
        if len(self.sites) != 1 or self.sites[0] == CONFIDENCE:
            raise ConfigError(f"probe {self.name!r} does not read one site's activations; "
                             "a direction exists for single-site probes only")
        v = self.weight / self.std
        return (v / np.linalg.norm(v)).astype(np.float32)

    def save(self, out_dir: str | Path) -> Path:
        """``probe.safetensors`` (weight, mean, std) + ``probe.json`` (everything else)."""
        out = Path(out_dir)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), np.float32))
                   for k in ("weight", "mean", "std")}
        meta = {k: v for k, v in asdict(self).items()
                if k not in ("weight", "mean", "std", "identity")}
        with atomic_dir(out) as tmp:
            save_file(tensors, tmp / "probe.safetensors")
            write_artifact(tmp, "probe.json", {**meta, "tensors_hash": state_hash(tensors)},
                           self.identity)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        meta, _ = read_artifact(path, "probe.json", "probe", "memlens probe train")
        try:
            tensors = load_file(path / "probe.safetensors")
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path / 'probe.safetensors'} cannot be read ({exc}); train the "
                            "probe again") from None
        if state_hash(tensors) != meta.pop("tensors_hash", None):
            raise DataError(f"{path / 'probe.safetensors'} does not match its checksum "
                            "(corrupted or edited); train the probe again")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(meta) - known)
        if extra:
            raise DataError(f"{path / 'probe.json'} has keys a probe does not have: {extra}; "
                            "it was edited or written by another program")
        probe = cls(**meta, **{k: v.numpy() for k, v in tensors.items()})
        numbers = [probe.bias, probe.threshold, *probe.weight, *probe.mean, *probe.std]
        if not np.isfinite(numbers).all() or probe.weight.shape != probe.mean.shape:
            raise DataError(f"{path} holds a probe with non-finite or mismatched numbers; "
                            "train the probe again")
        return probe

    def check_model(self, handle, where: str = "the probe") -> None:
        """Refuse a model other than the one whose activations the probe was trained on."""
        Identity.from_json(self.identity, where).check_model(handle, where)


def fit_probe(site: str, x: np.ndarray, y: np.ndarray, config: ProbeConfig | None = None,
              identity: Identity | None = None) -> Probe:
    """One class-balanced logistic probe on activations ``x`` [n, d] with labels ``y`` [n]
    (scikit-learn; threshold: best F1 on the same tokens)."""
    config = config or ProbeConfig()
    mean, std = standardize(x)
    w, b = fit_sklearn((x - mean) / std, y, config)
    probe = Probe([site], w, b, mean, std, 0.5, config.align, class_gap=class_gap(x, y),
                  identity=identity.to_json() if identity else {})
    probe.threshold = best_threshold(y, probe.score(x))
    return probe
