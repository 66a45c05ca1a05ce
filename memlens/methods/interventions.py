"""Interventions at sites: ablate neurons, add or project out a direction, scale a LayerNorm.

Each is a context manager that hooks the HF modules under the site (so it acts in plain
forward passes and inside ``generate``) and always removes its hook, even on error. They
compose by nesting. A site is a TransformerLens hook name (``blocks.2.hook_resid_post``) or
an HF module path, optionally ``:input`` (``model.layers.2.mlp.down_proj:input``: the MLP
neurons of block 2).

Example:
    >>> with ablate(handle, "model.layers.2.mlp.down_proj:input", [5, 17]), \\
    ...         add_vector(handle, "blocks.2.hook_resid_post", direction, alpha=-4.0):
    ...     handle.model.generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from memlens.core.errors import ConfigError
from memlens.core.model import ModelHandle
from memlens.core.scoring import batches
from memlens.core.sites import run_sites, site_module

__all__ = ["ABLATIONS", "ablate", "add_vector", "edit_site", "project_out", "scale_layernorm",
           "site_activations"]

ABLATIONS = ("zero", "mean", "resample")

# A gate maps the site's activations [batch, pos, d] to a strength per position [batch, pos].
Gate = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def edit_site(handle: ModelHandle, site: str,
              fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the activation at ``site`` by ``fn(activation)`` while the block runs."""
    module, io = site_module(handle, site)

    def on_input(mod, args, kwargs):
        return (fn(args[0]), *args[1:]), kwargs

    def on_output(mod, args, output):
        if isinstance(output, tuple):  # decoder layers return (hidden, ...)
            return (fn(output[0]), *output[1:])
        return fn(output)

    hook = (module.register_forward_pre_hook(on_input, with_kwargs=True) if io == "input"
            else module.register_forward_hook(on_output))
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def site_activations(handle: ModelHandle, site: str, token_ids: list[list[int]],
                     batch_size: int = 32) -> torch.Tensor:
    """Activations at ``site`` of every real token of the sequences, [n_tokens, d]."""
    rows = []
    for _, ids, mask in batches(handle, token_ids, batch_size):
        acts = run_sites(handle, [site], ids, mask, backend="torch")[site]
        rows.append(acts[mask.bool()].float())
    return torch.cat(rows)


@contextmanager
def ablate(handle: ModelHandle, site: str, neurons: Sequence[int] | torch.Tensor,
           how: str = "zero", reference: list[list[int]] | torch.Tensor | None = None,
           seed: int = 0) -> Iterator[None]:
    """Ablate units ``neurons`` of the last dimension at ``site``.

    how: ``"zero"``; ``"mean"`` (their mean over ``reference``); ``"resample"`` (values of a
    random reference token, drawn anew per position). ``reference`` is token-id lists or
    precomputed activations [n, d] from :func:`site_activations`.
    """
    if how not in ABLATIONS:
        raise ConfigError(f"ablation {how!r} is not one of {ABLATIONS}")
    idx = torch.as_tensor(neurons, dtype=torch.long, device=handle.device)
    ref = None
    if how != "zero":
        if reference is None:
            raise ConfigError(f"ablation {how!r} needs reference=token-id lists (clean text) "
                             "or activations from site_activations()")
        ref = reference if isinstance(reference, torch.Tensor) else \
            site_activations(handle, site, reference)
        ref = ref[:, idx.cpu()].to(handle.device)
    generator = torch.Generator(device=handle.device).manual_seed(seed)

    def fn(x):
        x = x.clone()
        if how == "zero":
            x[..., idx] = 0
        elif how == "mean":
            x[..., idx] = ref.mean(0).to(x.dtype)
        else:
            pick = torch.randint(len(ref), x.shape[:-1], generator=generator, device=x.device)
            x[..., idx] = ref[pick].to(x.dtype)
        return x

    with edit_site(handle, site, fn):
        yield


@contextmanager
def add_vector(handle: ModelHandle, site: str, vector: torch.Tensor, alpha: float = 1.0,
               gate: Gate | None = None) -> Iterator[None]:
    """Add ``alpha * vector`` at ``site`` (steering); with ``gate``, scaled per position by
    ``gate(activation)``."""
    v = torch.as_tensor(vector, device=handle.device)

    def fn(x):
        strength = alpha if gate is None else alpha * gate(x)[..., None]
        return x + strength * v.to(x.dtype)

    with edit_site(handle, site, fn):
        yield


@contextmanager
def project_out(handle: ModelHandle, site: str, direction: torch.Tensor,
                gate: Gate | None = None) -> Iterator[None]:
    """Remove the component of the activation along ``direction`` (normalized here); with
    ``gate``, only that fraction of it per position."""
    d = torch.as_tensor(direction, device=handle.device).float()
    d = d / d.norm()

    def fn(x):
        along = (x.float() @ d)[..., None]
        if gate is not None:
            along = along * gate(x)[..., None]
        return (x.float() - along * d).to(x.dtype)

    with edit_site(handle, site, fn):
        yield


@contextmanager
def scale_layernorm(handle: ModelHandle, module_path: str, factor: float) -> Iterator[None]:
    """Multiply a normalization layer's output (its gain and bias) by ``factor``."""
    module, _ = site_module(handle, module_path)
    if "norm" not in type(module).__name__.lower():
        raise ConfigError(f"{module_path!r} is a {type(module).__name__}, not a normalization "
                         "layer; name a LayerNorm/RMSNorm module such as "
                         "'model.layers.0.post_attention_layernorm'")
    with edit_site(handle, module_path, lambda x: x * factor):
        yield
