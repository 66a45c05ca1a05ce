"""K-FAC step: a model and its factors -> an edited model directory (keep-mass, or a
KL-budgeted edit aimed at what the labels say the model recites)."""

from __future__ import annotations

from pathlib import Path

from memlens.core.errors import ConfigError
from memlens.core.model import ModelHandle
from memlens.core.storage import prepare_output
from memlens.data.labels import (
    Labels,
)
from memlens.methods.curvature import (
    Factors,
    apply_weights,
    budget_weights,
    eigenbasis,
    kfac_weights,
    memorization_gradient,
    rho_layers,
)

__all__ = ["kfac_edit_step"]


def kfac_edit_step(handle: ModelHandle, factors: Factors | str | Path, out: str | Path,
                   rho: float | dict[str, float] | None = None,
                   kl_budget: float | None = None, labels: Labels | None = None) -> Path:
    """Edit the model with its K-FAC factors and save it to ``out``: the keep-mass edit
    (``rho``), or a KL-budgeted one, aimed at what ``labels`` say it recites."""
    if (rho is None) == (kl_budget is None):
        raise ConfigError("give exactly one of rho (keep-mass edit) or kl_budget")
    if labels is not None and kl_budget is None:
        raise ConfigError("labels aim a --kl-budget edit; drop them or use --kl-budget")
    if Path(out).resolve() == Path(handle.name).resolve():
        raise ConfigError(f"--out {out} is the model being edited; choose a new directory")
    prepare_output(out, "edit", marker="memlens_edit.json")
    where = str(factors) if not isinstance(factors, Factors) else "the factors"
    factors = factors if isinstance(factors, Factors) else Factors.load(factors)
    factors.identity.check_model(handle, where)
    # Layers a keep-mass edit leaves alone need no eigendecomposition.
    edited = rho_layers(factors.layers, rho) if rho is not None else None
    if edited == []:
        raise ConfigError(f"rho {rho!r} names none of the factor file's layers (e.g. "
                          f"{factors.layers[:2]}); use 'mlp'-style globs like "
                          "'model.layers.3.*=0.6' or one number for every layer")
    basis = eigenbasis(factors, edited)
    meta: dict = {"factors": where}
    if rho is not None:
        weights = kfac_weights(handle, basis, rho)
        meta["rho"] = rho
    else:
        grads = None
        if labels is not None:
            labels.check_model(handle)
            targets = labels.recited_targets()
            grads = memorization_gradient(handle, targets, factors.layers,
                                          start=labels.config.prefix)
            meta["memorized"] = {"labels": labels.where, "n_recited": len(targets)}
        weights = budget_weights(handle, basis, kl_budget, grads)
        meta["kl_budget"] = kl_budget
    edit = apply_weights(handle, weights)
    try:
        return edit.save(out, metadata=meta)
    finally:
        edit.restore()
