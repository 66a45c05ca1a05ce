"""K-FAC curvature of linear layers: factors, eigenbasis, and keep-mass weight edits.

For a linear layer ``y = W [a; 1]`` K-FAC approximates the Fisher of ``W`` by ``G (x) A`` with
``A = E[a a^T]`` (layer inputs) and ``G = E[g g^T]`` (loss gradients at the layer output),
averaged over tokens. In the joint eigenbasis, component (i, j) of ``C = U_G^T W U_A`` has
curvature ``l_i * m_j``. Memorized text loads on low-curvature components; the edit keeps
the highest-curvature components that hold a fraction ``rho`` of the curvature mass.

Example:
    >>> factors = collect_factors(handle, [s.token_ids for s in general], KFACConfig())
    >>> basis = eigenbasis(factors)
    >>> with kfac_edit(handle, basis, rho=0.8):
    ...     edit_metrics(handle, canaries, heldout)   # recites less
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memlens.core import distributed
from memlens.core.config import COUNT, INDEX, Config, option
from memlens.core.errors import ConfigError, DataError, MissingArtifactError, UserError
from memlens.core.identity import Identity, state_hash
from memlens.core.model import ModelHandle
from memlens.core.modules import find_layers, linear_modules, linear_weight, tracking_gradients
from memlens.core.progress import progress as progress_bar
from memlens.core.scoring import batches, forward, objective, predicts
from memlens.core.storage import exclusive, writing
from memlens.methods.edits import ParameterEdit

__all__ = ["MODES", "Factors", "KFACConfig", "LayerBasis", "aimed_edit", "batch_seed",
           "budget_weights", "collect_factors", "component_loading", "eigenbasis",
           "gradient_step_weights", "kfac_edit", "kfac_weights", "layer_rows", "mass_curves",
           "memorization_gradient", "rho_layers", "spectra", "svd_weights"]

MODES = ("true", "empirical")


@dataclass
class KFACConfig(Config):
    """What to collect and how.

    layers: ``"mlp"`` (every MLP projection), ``"attn"`` (attention projections), or
        module-name globs such as ``"model.layers.3.mlp.*"``.
    mode: ``"true"`` samples labels from the model's own softmax (the Fisher);
        ``"empirical"`` uses the gold next tokens.
    max_tokens: stop after this many tokens (whole batches); None reads everything.
    layers_per_pass: accumulate this many layers' factors per pass over the data (the
        others wait on the CPU), so that the device holds only their factors; None: all
        in one pass. The factors are the same either way (the data is read once per pass).
    """

    layers: tuple[str, ...] = option(("mlp",), "mlp, attn, or module-name globs")
    mode: str = option("true", "true (labels sampled from the model: the Fisher) or "
                       "empirical (the gold tokens)", choices=MODES)
    max_tokens: int | None = option(None, "stop after this many tokens", COUNT)
    batch_size: int = option(16, "sequences per pass", COUNT)
    max_len: int | None = option(None, "cut sequences to this length", COUNT)
    seed: int = option(0, "label sampling seed", INDEX)
    layers_per_pass: int | None = option(None, "layers whose factors one pass over the data "
                                         "accumulates (the device holds only theirs)", COUNT)

    def __post_init__(self):
        self.layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        super().__post_init__()

    def identity_config(self) -> dict:
        """The settings that decide the factors (``layers_per_pass`` only schedules them)."""
        return {k: v for k, v in asdict(self).items() if k != "layers_per_pass"}


@dataclass
class Factors:
    """K-FAC factors per layer: ``A[name]`` [in(+1), in(+1)], ``G[name]`` [out, out] (means)."""

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.A)

    @property
    def identity(self) -> Identity:
        return Identity.from_json(self.meta.get("identity"), "the factors")

    def save(self, path: str | Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
        """One safetensors file: ``NAME.A`` and ``NAME.G`` per layer; the token count, layer
        names and identity header in its ``memlens`` metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = dict(extra or {})
        tensors.update({f"{n}.A": a.cpu().contiguous() for n, a in self.A.items()})
        tensors.update({f"{n}.G": g.cpu().contiguous() for n, g in self.G.items()})
        meta = {**self.meta, "tokens": self.tokens, "layers": self.layers,
                "tensors_hash": state_hash(tensors)}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with writing(path):
                save_file(tensors, str(tmp), metadata={"memlens": json.dumps(meta)})
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Factors:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingArtifactError(f"no factor file at {path}; create one with `memlens "
                                       "kfac collect --model DIR --data ... --out FILE`")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("memlens", "{}"))
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{path} is not a readable safetensors file ({exc}); it is "
                            "truncated or not a factor file: collect the factors again") from None
        if "layers" not in meta:
            raise DataError(f"{path} is not a memlens factor file (no 'memlens' metadata)")
        Identity.from_json(meta.get("identity"), str(path)).expect_kind("factors", str(path))
        if state_hash({k: v for k, v in tensors.items()}) != meta.pop("tensors_hash", None):
            raise DataError(f"{path} does not match its checksum (corrupted); collect the "
                            "factors again")
        return cls({n: tensors[f"{n}.A"] for n in meta["layers"]},
                   {n: tensors[f"{n}.G"] for n in meta["layers"]}, meta.pop("tokens"), meta)


def batch_seed(seed: int, batch: int) -> int:
    """The label sampler's seed for batch ``batch``: each batch draws from its own stream,
    so a batch's labels do not depend on which process or run computes it."""
    return seed * 1_000_003 + batch


def layer_rows(handle: ModelHandle, seqs: list[list[int]], names: list[str], mode: str,
               batch_size: int = 16, start: int = 1, seed: int = 0,
               batch_ids: list[int] | None = None, progress: bool = False,
               desc: str = "K-FAC", done: int = 0
               ) -> Iterator[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Per batch, each layer's fp32 input rows ``[n, in(+1)]`` and output-gradient rows
    ``[n, out]`` at the positions that predict a next token at index >= ``start``.

    ``batch_ids`` picks batches (default: all, in order); ``done`` of them were finished
    before (the progress bar starts there). Layers fed the same input (gate and up
    projections) get the same input-row tensor. Only activation gradients are computed,
    never parameter gradients; ``mode="true"`` samples labels with :func:`batch_seed`.
    """
    modules = linear_modules(handle.model)
    state: dict = {}

    def hook(name):
        def fn(module, args, output):
            a = args[0]
            key = (a.data_ptr(), module.bias is not None)
            if key not in state["inputs"]:
                rows = a.detach().reshape(-1, a.shape[-1])[state["keep"]].float()
                if module.bias is not None:
                    rows = torch.cat([rows, rows.new_ones(len(rows), 1)], dim=1)
                state["inputs"][key] = rows
            state["rows"][name] = state["inputs"][key]
            state["outputs"].append((name, output))
        return fn

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    n_batches = -(-len(seqs) // batch_size)
    batch_ids = list(range(n_batches)) if batch_ids is None else batch_ids
    generator = torch.Generator(device=handle.device)
    try:
        with tracking_gradients(handle.model):
            for b in progress_bar(batch_ids[done:], disable=not progress, desc=desc,
                                  unit="batch", initial=done, total=len(batch_ids)):
                ids, mask = handle.pad(seqs[b * batch_size:(b + 1) * batch_size])
                keep = predicts(mask, start)
                state.update(keep=torch.cat([keep, torch.zeros_like(keep[:, :1])], 1).reshape(-1),
                             inputs={}, rows={}, outputs=[])
                generator.manual_seed(batch_seed(seed, b))
                loss = objective(forward(handle, ids, mask), ids, keep, mode, generator)
                grads = torch.autograd.grad(loss, [o for _, o in state["outputs"]])
                yield b, {name: (state["rows"][name],
                                 g.reshape(-1, g.shape[-1])[state["keep"]].float())
                          for (name, _), g in zip(state["outputs"], grads, strict=True)}
                state.clear()
    finally:
        for h in hooks:
            h.remove()
        state.clear()


def collect_factors(handle: ModelHandle, token_ids: list[list[int]],
                    cfg: KFACConfig | None = None, out: str | Path | None = None,
                    progress: bool = True, checkpoint_every: int = 50) -> Factors:
    """Accumulate K-FAC factors over a token stream (fp32 sums, divided by the token count).

    Positions whose next token is padding or absent are dropped, as in the published code.
    With ``out``, the result is saved there and a partial sum is checkpointed every
    ``checkpoint_every`` batches to ``OUT.partial``; an interrupted run resumes from it, and a
    finished one with the same identity (model, sequences, config) is loaded, not redone.
    """
    cfg = cfg or KFACConfig()
    names = find_layers(handle.model, cfg.layers)
    seqs = [list(s[:cfg.max_len]) for s in token_ids if len(s[:cfg.max_len]) >= 2]
    if not seqs:
        raise DataError("collect_factors needs sequences of at least two tokens")
    identity = Identity.make("factors", handle, seqs, cfg.identity_config())
    meta = {"identity": identity.to_json(), "n_sequences": len(seqs)}
    if out is None:
        return _accumulate(handle, seqs, names, cfg, meta, None, progress, checkpoint_every)
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name a .safetensors file")
    if out.exists():
        try:
            done = Factors.load(out)
        except DataError as exc:
            raise ConfigError(f"--out {out} exists and is not a memlens factor file ({exc}); "
                              "choose another path, so that it is not overwritten") from None
        if done.meta.get("identity") == meta["identity"]:
            return done  # the same collection finished before
    with distributed.only_main(exclusive(out, "collect K-FAC factors")):
        factors = _accumulate(handle, seqs, names, cfg, meta, out, progress, checkpoint_every)
        if distributed.is_main():
            factors.save(out)
        distributed.barrier()
        _partial_path(out).unlink(missing_ok=True)
    return factors


def _partial_path(out: Path) -> Path:
    """Where this process checkpoints its partial sums (one file per torchrun rank)."""
    size = distributed.world_size()
    return Path(f"{out}.partial" if size == 1 else
                f"{out}.rank{distributed.rank()}-of-{size}.partial")


def _batches_to_read(seqs: list[list[int]], cfg: KFACConfig) -> int:
    """Whole batches until ``max_tokens`` is reached: fixed before any compute, so the same
    batches are read on any number of ranks."""
    counts = [sum(len(s) - 1 for s in seqs[i:i + cfg.batch_size])
              for i in range(0, len(seqs), cfg.batch_size)]
    if cfg.max_tokens is None:
        return len(counts)
    return next((b + 1 for b, t in enumerate(itertools.accumulate(counts))
                 if t >= cfg.max_tokens), len(counts))


def _accumulate(handle, seqs, names, cfg, meta, out, progress, checkpoint_every) -> Factors:
    dev = handle.device
    modules = linear_modules(handle.model)
    dims = {n: linear_weight(modules[n]).shape for n in names}
    size, rank = distributed.world_size(), distributed.rank()
    batch_ids = [b for b in range(_batches_to_read(seqs, cfg)) if b % size == rank]
    step = cfg.layers_per_pass or len(names)
    passes = [names[i:i + step] for i in range(0, len(names), step)]
    A: dict[str, torch.Tensor] = {}  # finished layers' sums (on the CPU between passes)
    G: dict[str, torch.Tensor] = {}
    first, done, tokens = 0, 0, 0
    partial = _partial_path(out) if out is not None else None
    saved = _load_partial(partial, meta, len(passes))
    if saved is not None:
        A, G = saved.A, saved.G
        first, done, tokens = saved.meta["pass"], saved.meta["done"], saved.tokens
    t0 = time.perf_counter()
    for p in range(first, len(passes)):
        layers = passes[p]
        # the sums of this pass, on the device (resumed ones from the checkpoint)
        a_sum = {n: A.pop(n, torch.zeros(dims[n][1], dims[n][1])).to(dev) for n in layers}
        g_sum = {n: G.pop(n, torch.zeros(dims[n][0], dims[n][0])).to(dev) for n in layers}
        desc = "K-FAC factors" + (f" (pass {p + 1}/{len(passes)})" if len(passes) > 1 else "")
        rows = layer_rows(handle, seqs, layers, cfg.mode, cfg.batch_size, seed=cfg.seed,
                          batch_ids=batch_ids, done=done, progress=progress, desc=desc)
        for i, (_, batch) in enumerate(rows, start=done + 1):
            outer: dict[int, torch.Tensor] = {}
            for name, (a, g) in batch.items():
                if id(a) not in outer:  # shared input: one product for gate and up
                    outer[id(a)] = a.T @ a
                if a_sum[name].device != a.device:  # a device_map put the layer elsewhere
                    a_sum[name], g_sum[name] = a_sum[name].to(a.device), g_sum[name].to(a.device)
                a_sum[name] += outer[id(a)]
                g_sum[name].addmm_(g.T, g)
            tokens += len(g)
            if partial is not None and i % checkpoint_every == 0:
                Factors({**A, **a_sum}, {**G, **g_sum}, tokens,
                        {**meta, "pass": p, "done": i, "passes": len(passes)}).save(partial)
        for n in layers:
            A[n] = distributed.all_reduce_sum(a_sum.pop(n)).to("cpu" if len(passes) > 1
                                                                 else dev)
            G[n] = distributed.all_reduce_sum(g_sum.pop(n)).to("cpu" if len(passes) > 1
                                                                 else dev)
        if p + 1 < len(passes):
            done, tokens = 0, 0  # every pass reads the same tokens
    tokens = int(distributed.total(tokens))
    if tokens == 0:
        raise DataError("no token had a next token to predict; check the sequences")
    meta = {**meta, "seconds": round(time.perf_counter() - t0, 2), "passes": len(passes)}
    return Factors({n: A[n] / tokens for n in names}, {n: G[n] / tokens for n in names},
                   tokens, meta)


def _load_partial(partial: Path | None, meta: dict, passes: int) -> Factors | None:
    """The checkpoint of an interrupted collection of the same factors, if there is one."""
    if partial is None or not partial.is_file():
        return None
    try:
        saved = Factors.load(partial)
    except DataError as exc:  # a checkpoint cut short by a crash: start over
        print(f"memlens: {partial} is unreadable ({exc}); starting from the first batch",
              file=sys.stderr)
        return None
    if saved.meta.get("identity") != meta["identity"] or saved.meta.get("passes") != passes:
        return None
    return saved


def memorization_gradient(handle: ModelHandle, seqs: list[list[int]], layers: list[str],
                          start: int = 32, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Gradient of the summed gold-token log-odds over predictions of tokens at index >=
    ``start`` (the suffix of memorized sequences), per layer as [out, in(+1)]: which weights
    hold up the recitation."""
    modules = linear_modules(handle.model)
    params = [(n, p) for n in layers for p in (modules[n].weight, modules[n].bias)
              if p is not None]
    sums = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
    with tracking_gradients(handle.model):
        for _, ids, mask in batches(handle, seqs, batch_size):
            margin = objective(forward(handle, ids, mask), ids, predicts(mask, start), "margin")
            for total, g in zip(sums, torch.autograd.grad(margin, [p for _, p in params]),
                                strict=True):
                total += g.float()
    grads = {id(p): g for (_, p), g in zip(params, sums, strict=True)}
    return {n: linear_weight(modules[n], grads) for n in layers}


@dataclass
class LayerBasis:
    """Eigenbasis of one layer's factors: ``G = U_G diag(eig_G) U_G^T`` and
    ``A = U_A diag(eig_A) U_A^T``, eigenvalues in descending order (clamped at 0)."""

    eig_G: torch.Tensor
    U_G: torch.Tensor
    eig_A: torch.Tensor
    U_A: torch.Tensor

    def project(self, W: torch.Tensor) -> torch.Tensor:
        """``C = U_G^T W U_A``: the weight in component coordinates [out, in]."""
        return self.U_G.T @ W @ self.U_A

    def unproject(self, C: torch.Tensor) -> torch.Tensor:
        return self.U_G @ C @ self.U_A.T

    @property
    def curvature(self) -> torch.Tensor:
        """``eig_G[i] * eig_A[j]`` for every component, [out, in]."""
        return self.eig_G[:, None] * self.eig_A[None, :]

    def keep_mask(self, rho: float) -> torch.Tensor:
        """Boolean [out, in]: the highest-curvature components holding ``rho`` of the mass.

        ``rho = 1`` keeps every component, those of zero curvature included (no edit).
        """
        if not 0.0 <= rho <= 1.0:
            raise ConfigError(f"keep-mass rho must lie in [0, 1], got {rho}")
        if rho == 1.0:
            return torch.ones_like(self.curvature, dtype=torch.bool)
        flat = self.curvature.flatten()
        order = flat.argsort(descending=True)
        cum = flat[order].cumsum(0)
        n_keep = int(torch.searchsorted(cum, rho * cum[-1]).item()) + 1 if rho > 0 else 0
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[order[:min(n_keep, len(flat))]] = True
        return mask.view_as(self.curvature)

    def mass_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fraction of components kept, fraction of curvature mass kept), highest first."""
        flat = self.curvature.flatten().sort(descending=True).values
        cum = flat.cumsum(0) / flat.sum().clamp_min(1e-30)
        frac = torch.arange(1, len(flat) + 1, dtype=cum.dtype) / len(flat)
        return frac, cum


def _eig_desc(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(M.double().cpu())
    return vals.flip(0).clamp_min(0).float(), vecs.flip(1).float()


def eigenbasis(factors: Factors, layers: list[str] | None = None) -> dict[str, LayerBasis]:
    """Eigendecompose each layer's factors (in float64, on CPU)."""
    out = {}
    for name in layers or factors.layers:
        if name not in factors.A:
            raise UserError(f"no factors for layer {name!r}; the file has {factors.layers}")
        out[name] = LayerBasis(*_eig_desc(factors.G[name]), *_eig_desc(factors.A[name]))
    return out


def _rho_for(rho: float | dict[str, float], name: str) -> float | None:
    if isinstance(rho, dict):
        return next((v for pat, v in rho.items() if pat == name or fnmatch(name, pat)), None)
    return rho


def rho_layers(names: list[str], rho: float | dict[str, float]) -> list[str]:
    """The layers among ``names`` that a keep-mass ``rho`` edits."""
    return [n for n in names if _rho_for(rho, n) is not None]


def kfac_weights(handle: ModelHandle, basis: dict[str, LayerBasis],
                 rho: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Edited [out, in(+1)] weights: keep-mass ``rho`` (one value, or per layer name/glob)."""
    modules = linear_modules(handle.model)
    out = {}
    for name, b in basis.items():
        r = _rho_for(rho, name)
        if r is None:
            continue
        W = linear_weight(modules[name]).cpu()
        out[name] = b.unproject(b.project(W) * b.keep_mask(r))
    if not out:
        raise ConfigError(f"rho {rho!r} selects none of the layers {list(basis)}")
    return out


def budget_weights(handle: ModelHandle, basis: dict[str, LayerBasis], kl_budget: float,
                   memorized_grad: dict[str, torch.Tensor] | None = None,
                   shuffle: int | None = None) -> dict[str, torch.Tensor]:
    """Remove components across all layers until their predicted KL on clean text reaches
    ``kl_budget`` (nats per token).

    Zeroing component (i, j) costs about ``0.5 * eig_G[i] * eig_A[j] * C_ij**2`` (the K-FAC
    quadratic model of the KL to the unedited model). Without ``memorized_grad`` the cheapest
    components go first. With it (from :func:`memorization_gradient`), only components that
    hold up recitation (``C_ij * D_ij > 0``, D the gradient in the basis) are removed, in order
    of recitation log-odds per unit of cost, so layers and projections are chosen by the data.
    ``shuffle`` (a seed) removes components in a random order instead: the control that an
    edit's selection, not its size, does the work.
    """
    if kl_budget < 0:
        raise ConfigError(f"kl_budget is a KL in nats per token and must be >= 0, got {kl_budget}")
    modules = linear_modules(handle.model)
    coords, costs, ranks = {}, [], []
    for name, b in basis.items():
        C = b.project(linear_weight(modules[name]).cpu())
        cost = 0.5 * b.curvature * C ** 2
        coords[name] = C
        costs.append(cost.flatten())
        if memorized_grad is not None:
            if name not in memorized_grad:
                raise UserError(f"memorized_grad has no layer {name!r}; compute it for the "
                               "same layers as the factors")
            support = C * b.project(memorized_grad[name].cpu())
            ranks.append(torch.where(support > 0, -support / cost.clamp_min(1e-30),
                                     torch.inf).flatten())
        else:
            ranks.append(cost.flatten())
    cost, rank = torch.cat(costs), torch.cat(ranks)
    if shuffle is not None:
        rank = torch.rand(len(cost), generator=torch.Generator().manual_seed(shuffle))
    order = rank.argsort()
    order = order[rank[order].isfinite()]
    n_remove = int(torch.searchsorted(cost[order].cumsum(0), kl_budget))
    keep = torch.ones_like(cost, dtype=torch.bool)
    keep[order[:n_remove]] = False
    out, offset = {}, 0
    for name, C in coords.items():
        out[name] = basis[name].unproject(C * keep[offset:offset + C.numel()].view_as(C))
        offset += C.numel()
    return out


def gradient_step_weights(handle: ModelHandle, basis: dict[str, LayerBasis], kl_budget: float,
                          memorized_grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One step against the recitation gradient (:func:`memorization_gradient`) on every
    layer of ``basis``, sized so its predicted KL (the same K-FAC quadratic model as
    :func:`budget_weights`) is ``kl_budget``: an aimed edit without curvature's selection,
    to compare the aimed component removal with at equal predicted cost."""
    if kl_budget < 0:
        raise ConfigError(f"kl_budget is a KL in nats per token and must be >= 0, got {kl_budget}")
    modules = linear_modules(handle.model)
    steps = {name: b.project(memorized_grad[name].cpu()) for name, b in basis.items()}
    cost = sum(float((0.5 * basis[n].curvature * D ** 2).sum()) for n, D in steps.items())
    scale = (kl_budget / cost) ** 0.5 if cost > 0 else 0.0
    return {name: basis[name].unproject(b.project(linear_weight(modules[name]).cpu())
                                        - scale * steps[name])
            for name, b in basis.items()}


def kfac_edit(handle: ModelHandle, basis: dict[str, LayerBasis], rho=None,
              kl_budget: float | None = None,
              memorized_grad: dict[str, torch.Tensor] | None = None) -> ParameterEdit:
    """The edit as a removal (``with kfac_edit(...).apply(handle):``); the model is not
    changed here.

    Give ``rho`` for the published keep-mass edit (a float, or per layer name/glob), or
    ``kl_budget`` (and optionally ``memorized_grad``) for :func:`budget_weights`.
    """
    if (rho is None) == (kl_budget is None):
        raise ConfigError("give exactly one of rho (keep-mass edit) or kl_budget")
    if rho is not None:
        return ParameterEdit(kfac_weights(handle, basis, rho))
    if memorized_grad is not None:
        return aimed_edit(handle, basis, kl_budget, grads=memorized_grad)
    return ParameterEdit(budget_weights(handle, basis, kl_budget))


def aimed_edit(handle: ModelHandle, basis: dict[str, LayerBasis], kl_budget: float,
               targets: list[list[int]] | None = None, start: int = 1,
               grads: dict[str, torch.Tensor] | None = None) -> ParameterEdit:
    """The K-FAC edit aimed at what the model recites: the components of ``basis`` that hold
    up recitation of ``targets`` (token ids; their tokens from index ``start`` scored, e.g.
    the suffix), most recitation per unit of predicted KL first, up to ``kl_budget``.
    ``grads`` (from :func:`memorization_gradient`) stand in for ``targets`` when a sweep
    over budgets computes them once."""
    if grads is None:
        if not targets:
            raise ConfigError("an aimed edit needs the recited targets (or their gradients)")
        grads = memorization_gradient(handle, targets, list(basis), start=start)
    return ParameterEdit(budget_weights(handle, basis, kl_budget, grads))


def svd_weights(handle: ModelHandle, layers: list[str], rho: float) -> dict[str, torch.Tensor]:
    """Baseline: keep the largest singular components of W holding ``rho`` of sum(sigma^2)."""
    modules = linear_modules(handle.model)
    out = {}
    for name in layers:
        W = linear_weight(modules[name]).cpu().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        cum = (S ** 2).cumsum(0)
        k = len(S) if rho >= 1 else int(torch.searchsorted(cum, rho * cum[-1]).item()) + 1
        out[name] = ((U[:, :k] * S[:k]) @ Vh[:k]).float()
    return out


def component_loading(handle: ModelHandle, basis: dict[str, LayerBasis],
                      seqs: list[list[int]], start: int = 1, n_bins: int = 10,
                      batch_size: int = 16) -> pd.DataFrame:
    """How tokens load on components, binned by curvature rank (bin 0 = highest curvature).

    Per token, the gradient of the gold token's log-odds at the layer output and the layer
    input are projected on the eigenbases; the token's loading on component (i, j) is
    ``(U_G^T g)_i^2 (U_A^T a)_j^2``, normalized to sum 1 per token. Returns one row per
    (layer, bin) with the mean loading; compare memorized with clean text.
    """
    sums = {n: 0 for n in basis}
    n_tokens = 0
    for _, batch in layer_rows(handle, seqs, list(basis), "margin", batch_size, start=start):
        for name, (a, g) in batch.items():
            pa = (a @ basis[name].U_A) ** 2
            pg = (g @ basis[name].U_G) ** 2
            pa = pa / pa.sum(1, keepdim=True).clamp_min(1e-30)
            pg = pg / pg.sum(1, keepdim=True).clamp_min(1e-30)
            sums[name] = sums[name] + pg.T @ pa
        n_tokens += len(a)
    if n_tokens == 0:
        raise DataError(f"no token at position >= {start} in {len(seqs)} sequences")
    rows = []
    for name, b in basis.items():
        order = b.curvature.flatten().argsort(descending=True)
        loading = (sums[name].flatten() / n_tokens)[order]
        for i, chunk in enumerate(loading.tensor_split(n_bins)):
            rows.append(dict(layer=name, bin=i, loading=float(chunk.sum())))
    return pd.DataFrame(rows)


def spectra(basis: dict[str, LayerBasis]) -> pd.DataFrame:
    """Eigenvalues of every layer's factors as a table: layer, factor (A or G), rank
    (1 = largest), eigenvalue."""
    rows = [pd.DataFrame({"layer": name, "factor": factor,
                          "rank": range(1, len(vals) + 1), "eigenvalue": vals.tolist()})
            for name, b in basis.items() for factor, vals in (("A", b.eig_A), ("G", b.eig_G))]
    return pd.concat(rows, ignore_index=True)


def mass_curves(basis: dict[str, LayerBasis], n_points: int = 400) -> pd.DataFrame:
    """Per layer, the fraction of curvature mass kept against the fraction of components
    kept (highest curvature first), at ``n_points`` log-spaced points: layer, components,
    mass."""
    rows = []
    for name, b in basis.items():
        frac, cum = b.mass_curve()
        idx = torch.unique(torch.logspace(0, torch.log10(torch.tensor(float(len(frac)))).item(),
                                          n_points).long().clamp(1, len(frac)) - 1)
        rows.append(pd.DataFrame({"layer": name, "components": frac[idx].tolist(),
                                  "mass": cum[idx].tolist()}))
    return pd.concat(rows, ignore_index=True)
