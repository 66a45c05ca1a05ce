"""K-FAC step: a model and its factors -> an edited model directory (keep-mass, or a
KL-budgeted edit aimed at what the labels say the model recites)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from memlens.core.config import POSITIVE, Config, nested, option
from memlens.core.errors import ConfigError
from memlens.core.model import ModelHandle, ModelOptions
from memlens.core.modules import block_path
from memlens.core.storage import prepare_output
from memlens.data.labels import Labels, manifest_roles, read_sequences
from memlens.methods.curvature import (
    Factors,
    KFACConfig,
    aimed_edit,
    budget_weights,
    collect_factors,
    component_loading,
    eigenbasis,
    kfac_edit,
    kfac_weights,
    memorization_gradient,
    rho_layers,
    svd_weights,
)
from memlens.methods.edits import ParameterEdit
from memlens.report.figures import loading_figure
from memlens.report.page import Section
from memlens.steps.calibrate import choose, evaluate, needs_recited
from memlens.steps.chain import Chain

__all__ = ["AFTER", "NAME", "SETTINGS", "TEXT", "TITLE", "CollectCommand", "EditCommand", "collect",
           "compare", "edit", "kfac_edit_step", "needs", "parse_rho", "removal", "report",
           "where_to_look"]


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
    if labels is not None:
        labels.check_model(handle)
        targets = labels.recited_targets()
        edit = aimed_edit(handle, basis, kl_budget, targets, start=labels.config.prefix)
        meta["memorized"] = {"labels": labels.where, "n_recited": len(targets)}
    else:
        edit = kfac_edit(handle, basis, rho=rho, kl_budget=kl_budget)
    meta |= {"rho": rho} if rho is not None else {"kl_budget": kl_budget}
    return edit.save(handle, out, metadata=meta)


def parse_rho(values: tuple[str, ...]) -> float | dict[str, float]:
    """``--rho 0.9`` (every layer) or ``--rho 'model.layers.3.*=0.6' ...`` (per glob)."""
    def number(text):
        try:
            r = float(text)
        except ValueError:
            raise ConfigError(f"--rho {text!r} is not a number") from None
        if not 0 <= r <= 1:
            raise ConfigError(f"keep-mass rho must lie in [0, 1], got {r}")
        return r

    if len(values) == 1 and "=" not in values[0]:
        return number(values[0])
    out = {}
    for v in values:
        pattern, sep, value = v.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"--rho {v!r}: give one number, or GLOB=NUMBER per layer group")
        out[pattern] = number(value)
    return out


@dataclass(kw_only=True)
class CollectCommand(Config):
    """accumulate A and G factors over a token stream

    Writes one safetensors file with A = E[a a^T] and G = E[g g^T] per layer. Rerun the
    same command to resume an interrupted collection.
    """

    EXAMPLE: ClassVar[str] = ("memlens kfac collect --model organisms/tiny --data "
                              "organisms/tiny --out kfac/tiny.safetensors")
    DISTRIBUTED: ClassVar[bool] = True

    model: ModelOptions = nested(ModelOptions)
    data: Path = option(help="JSONL of sequences, or an organism dir (its general records)")
    out: Path = option(help="factor file (.safetensors)")
    roles: tuple[str, ...] | None = option(None, "keep only these roles (default for an "
                                           "organism: general)")
    kfac: KFACConfig = nested(KFACConfig)


def collect(cmd: CollectCommand) -> None:
    handle = cmd.model.load()
    organism = manifest_roles(cmd.data) is not None
    roles = cmd.roles or (("general",) if organism else None)
    seqs = read_sequences(cmd.data, handle.tokenizer, roles=roles, max_tokens=cmd.kfac.max_len)
    factors = collect_factors(handle, [s.token_ids for s in seqs], cmd.kfac, out=cmd.out)
    print(f"{factors.tokens} tokens, {len(factors.layers)} layers -> {cmd.out}")


@dataclass(kw_only=True)
class EditCommand(Config):
    """remove low-curvature components and save the edited model

    The published keep-mass edit (--rho), or a KL-budgeted edit (--kl-budget), aimed with
    --labels at the sequences those labels say the model recites. Refuses factors or
    labels made with another model.
    """

    EXAMPLE: ClassVar[str] = ("memlens kfac edit --model organisms/tiny --factors "
                              "kfac/tiny.safetensors --kl-budget 0.003 --labels labels/tiny "
                              "--out organisms/tiny-edited")

    model: ModelOptions = nested(ModelOptions)
    factors: Path = option(help="from `memlens kfac collect`")
    out: Path = option(help="edited model directory")
    rho: tuple[str, ...] | None = option(None, "keep-mass for every layer (0.9), or per "
                                         "layer glob ('model.layers.3.*=0.6'); layers not "
                                         "named are left alone")
    kl_budget: float | None = option(None, "remove components until their predicted KL "
                                     "reaches this (nats)", POSITIVE)
    labels: Path | None = option(None, "with --kl-budget: a labels directory; the edit is "
                                 "aimed at the sequences they mark as recited")

    def __post_init__(self):
        super().__post_init__()
        if (self.rho is None) == (self.kl_budget is None):
            raise ConfigError("give --rho (keep-mass edit) or --kl-budget, one of the two")


def edit(cmd: EditCommand) -> None:
    rho = parse_rho(cmd.rho) if cmd.rho else None
    labels = Labels.load(cmd.labels) if cmd.labels else None
    out = kfac_edit_step(cmd.model.load(), cmd.factors, cmd.out, rho=rho,
                         kl_budget=cmd.kl_budget, labels=labels)
    print(f"edited model -> {out}")


# --------------------------------------------------------------------------- in the chain

NAME = "kfac"
TITLE = "3. Curvature (K-FAC) edit"
TEXT = ("K-FAC factors of every MLP projection give a curvature eigenbasis. Where to look is "
        "found from the data: per block, how much more of the recited sequences' gradient "
        "than of clean text's loads on the low-curvature half of the components. The aimed "
        "edit drops the components that hold up the recitation of the calibration half's "
        "recited sequences per unit of predicted KL, up to a KL budget, in the top blocks by "
        "that loading; the blocks and the budget are chosen on the calibration half and "
        "scored on the evaluation half.")
AFTER = ("labels",)
SETTINGS = ("max_ppl_increase", "target_removal", "kfac_tokens", "kfac_budgets", "kfac_compare")
LOW_BINS = 5  # of component_loading's 10 curvature bins: the lower half


def needs(d: Chain) -> str | None:
    return needs_recited(d)


def block_of(name: str, root: str) -> int:
    return int(name[len(root) + 1:].split(".")[0])


def where_to_look(d: Chain, basis) -> list[dict]:
    """Per block, the share of the recited sequences' gradient loading on low-curvature
    components, over that of clean text (calibration half), highest first."""
    targets = [q.token_ids[:d.cfg.prefix + d.cfg.suffix] for q in d.recited("calibration")]
    clean = [ids for ids in d.clean_ids("calibration") if len(ids) > d.cfg.prefix][:64]
    root = block_path(d.handle.model)
    rows = []
    for kind, seqs in (("recited", targets), ("clean", clean)):
        load = component_loading(d.handle, basis, seqs, d.cfg.prefix)
        low = load[load["bin"] >= LOW_BINS].groupby("layer")["loading"].sum()
        for layer, v in low.items():
            rows.append({"kind": kind, "block": block_of(layer, root), "low": float(v)})
    df = pd.DataFrame(rows).groupby(["block", "kind"])["low"].mean().unstack()
    df["ratio"] = df["recited"] / df["clean"].clip(lower=1e-12)
    df = df.sort_values("ratio", ascending=False).reset_index()
    return [{"block": int(r.block), "recited_low_curvature_share": float(r.recited),
             "clean_low_curvature_share": float(r.clean), "ratio": float(r.ratio)}
            for r in df.itertuples()]


def _setup(d: Chain, collect: bool = True):
    factors = (collect_factors(d.handle, [q.token_ids for q in d.splits.general],
                               KFACConfig(max_tokens=d.config.kfac_tokens),
                               out=d.factors_path, progress=d.progress)
               if collect else Factors.load(d.factors_path))
    basis = eigenbasis(factors)
    targets = [q.token_ids[:d.cfg.prefix + d.cfg.suffix] for q in d.recited("calibration")]
    grads = memorization_gradient(d.handle, targets, list(basis), start=d.cfg.prefix)
    return factors, basis, grads


def _edit(d: Chain, basis, grads, params: dict) -> ParameterEdit:
    root = block_path(d.handle.model)
    layers = {n: b for n, b in basis.items() if block_of(n, root) in params["blocks"]}
    return ParameterEdit(budget_weights(d.handle, layers, params["kl_budget"], grads))


def removal(d: Chain) -> ParameterEdit | None:
    """The chosen edit, rebuilt from the saved factors (for the audit)."""
    params = d.step_result(NAME)["chosen"]["params"]
    if params is None:
        return None
    _, basis, grads = _setup(d, collect=False)
    return _edit(d, basis, grads, params)


def compare(d: Chain, basis, blocks: list[int], sec: Section) -> dict:
    """The published keep-mass edit (Hsu et al. 2025: drop each layer's lowest-curvature
    components until ``rho`` of the curvature mass is kept, blind to what is memorized) and
    the SVD control (keep the top singular components holding ``rho`` of sum sigma^2),
    each chosen the same way as the aimed edit, on the blocks it chose and on every block,
    under the same budget: the same utility cost, compared on the evaluation half."""
    if not d.config.kfac_compare:
        return {}
    root = block_path(d.handle.model)
    scopes = {"the aimed edit's blocks": sorted(blocks),
              "every block": sorted({block_of(n, root) for n in basis})}
    rhos = sorted(d.config.kfac_compare, reverse=True)
    out = {}
    for what, weights in (("The published keep-mass edit", kfac_weights),
                          ("SVD of the weights", svd_weights)):
        families = {where: [{"label": f"keep {r:g}", "blocks": b, "rho": r} for r in rhos]
                    for where, b in scopes.items()}

        def apply(params, weights=weights):
            layers = {n: v for n, v in basis.items() if block_of(n, root) in params["blocks"]}
            w = (weights(d.handle, layers, params["rho"]) if weights is kfac_weights
                 else weights(d.handle, list(layers), params["rho"]))
            return ParameterEdit(w).apply(d.handle)

        out[what] = evaluate(d, apply, choose(d, families, apply), what, sec, figures=False)
    return out


def report(d: Chain, sec: Section) -> dict:
    factors, basis, grads = _setup(d)
    where = where_to_look(d, basis)
    sec.table(where)
    ranked = [w["block"] for w in where]
    sizes = sorted({k for k in (1, 2, 4, len(ranked)) if k <= len(ranked)})
    families = {(f"top {k} blocks by loading" if k < len(ranked) else "every block"):
                [{"label": f"KL budget {b:g}", "blocks": sorted(ranked[:k]), "kl_budget": b}
                 for b in sorted(d.config.kfac_budgets)] for k in sizes}
    cache: dict = {}

    def apply(params):
        key = (tuple(params["blocks"]), params["kl_budget"])
        if key not in cache:
            cache.clear()
            cache[key] = _edit(d, basis, grads, params)
        return cache[key].apply(d.handle)

    choice = choose(d, families, apply)
    headline = evaluate(d, apply, choice, "The aimed K-FAC edit", sec)
    if choice.params is not None:
        edited = sum(1 for n in basis if block_of(n, block_path(d.handle.model))
                     in choice.params["blocks"])
        headline |= {"layers": edited, "blocks": choice.params["blocks"],
                     "kl_budget": choice.params["kl_budget"]}
    headline["compared"] = compare(d, basis, choice.params["blocks"] if choice.params
                                   else ranked[:1], sec)
    recited = [q.token_ids for q in d.recited("evaluation")]
    sec.figure(loading_figure({
        "recited (evaluation half)": component_loading(d.handle, basis, recited, d.cfg.prefix),
        f"clean ({d.clean('evaluation')[1]})": component_loading(
            d.handle, basis, d.clean_ids("evaluation")[:64], d.cfg.prefix)}))
    return {**headline, "where_to_look": where, "where_to_look_by": "low-curvature gradient "
            "loading of recited vs clean text (calibration half)",
            "factor_tokens": factors.tokens, "n_layers": len(factors.layers)}
