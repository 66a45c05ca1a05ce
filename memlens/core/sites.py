"""Sites: where in a model activations are read or changed, and reading them.

A site is a TransformerLens hook name (``blocks.2.hook_resid_post``; globs such as
``blocks.*.mlp.hook_post``) or an HF module path (``model.layers.2`` reads its output,
``model.layers.2.mlp.down_proj:input`` its input). Three backends read the same tensors:
the TransformerLens bridge (``bridge``, every hook), nnsight (``nnsight``) and plain PyTorch
hooks on the HF modules (``torch``); the last two translate each hook name to the HF module
whose input or output it is.

Example:
    >>> sites = resolve_sites(handle, ["blocks.*.hook_resid_post"])
    >>> acts = run_sites(handle, sites, ids, mask)       # {site: [batch, pos, d]}
    >>> site_to_module(handle, "blocks.1.hook_resid_post")   # ('model.layers.1', 'output')
"""

from __future__ import annotations

import difflib
import fnmatch
import weakref
from contextlib import ExitStack, contextmanager

import torch

from memlens.core.errors import ConfigError, UserError
from memlens.core.model import ModelHandle
from memlens.core.modules import block_path

__all__ = ["BACKENDS", "UnknownSiteError", "available_sites", "block_input", "block_output",
           "execution_order", "is_hook_name", "resolve_sites", "run_sites", "site_module",
           "site_to_module"]

BACKENDS = ("auto", "bridge", "nnsight", "torch")


class UnknownSiteError(UserError):
    """A site name that the model does not have; the message lists the nearest ones."""


def available_sites(handle: ModelHandle) -> list[str]:
    """Every TransformerLens hook name of the model."""
    return list(handle.bridge.hook_dict)


def is_hook_name(site: str) -> bool:
    """TransformerLens hook names end in ``hook_*``; anything else is an HF module path."""
    return site.rpartition(".")[2].startswith("hook_")


def _is_module_path(handle: ModelHandle, site: str) -> bool:
    path, _, io = site.partition(":")
    try:
        handle.model.get_submodule(path)
    except AttributeError:
        return False
    return io in ("", "input", "output")


def resolve_sites(handle: ModelHandle, patterns: list[str]) -> list[str]:
    """Expand globs to hook names; an unknown name gets the nearest valid ones.

    HF module paths (``model.layers.2``, ``...down_proj:input``) pass through.
    """
    if all(_is_module_path(handle, p) for p in patterns):
        return list(patterns)  # no bridge needed (it does not cover every architecture)
    hook_dict = handle.bridge.hook_dict
    names = list(hook_dict)
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits and _is_module_path(handle, pat):
            hits = [pat]
        if not hits:
            modules = [n for n, _ in handle.model.named_modules() if n]
            near = difflib.get_close_matches(pat, names + modules, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise UnknownSiteError(f"unknown site {pat!r}{hint} (memlens.data.store."
                                   "available_sites(handle) lists the hook names)")
        out += [h for h in hits if h not in out]
    # A glob can hit several names of one hook point (aliases): keep the first of each.
    seen: set[int] = set()
    return [n for n in out if n not in hook_dict
            or not (id(hook_dict[n]) in seen or seen.add(id(hook_dict[n])))]


def site_to_module(handle: ModelHandle, site: str) -> tuple[str, str]:
    """The HF module path and ``"input"``/``"output"`` that a site reads.

    Follows the bridge's hook aliases down to a component boundary: ``hook_in`` is the
    wrapped HF module's input, ``hook_out`` its output. Module paths pass through
    (``model.layers.2`` reads the output, ``model.layers.2.mlp.down_proj:input`` the input).
    """
    if not is_hook_name(site):
        path, _, io = site.partition(":")
        return path, io or "output"
    bridge, asked = handle.bridge, site
    for _ in range(8):  # alias chains are short
        path, _, hook = site.rpartition(".")
        comp = bridge.get_submodule(path) if path else bridge
        if hook in ("hook_in", "hook_out"):
            orig = getattr(comp, "original_component", None)
            if orig is not None:
                return _hf_path(bridge, orig), "input" if hook == "hook_in" else "output"
            break
        alias = getattr(comp, "hook_aliases", {}).get(hook)
        if alias is None:
            break
        site = f"{path}.{alias[0] if isinstance(alias, list) else alias}".lstrip(".")
    raise ConfigError(f"site {asked!r} lives inside a TransformerLens component, not at an HF "
                     "module's input or output; capture it with backend='bridge'")


def _hf_path(bridge, module) -> str:
    # The bridge wraps each HF module as `<path>._original_component`; drop those segments.
    for name, mod in bridge.original_model.named_modules():
        if mod is module:
            return ".".join(p for p in name.split(".") if p != "_original_component")
    raise ValueError("module not found in the bridge's model")


# --------------------------------------------------------------------------- running


class _StopForward(Exception):
    """Raised by the last hook: nothing after it is needed."""


@contextmanager
def _recording(handle: ModelHandle, sites: list[str], backend: str, out: dict,
               before_edits: bool = False):
    """Within the block, a forward pass fills ``out[site]`` and stops after the last site;
    with ``before_edits`` (torch backend) each site is read before the hooks already on its
    module (an edit there, such as steering) change it."""
    n = len(sites)

    def keep(site, value):
        out[site] = value[0] if isinstance(value, tuple) else value
        if len(out) == n:
            raise _StopForward

    if backend == "bridge":
        hooks = [(s, lambda x, hook, s=s: keep(s, x)) for s in sites]
        with handle.bridge.hooks(fwd_hooks=hooks):
            yield handle.bridge.original_model
        return
    modules = {s: site_to_module(handle, s) for s in sites}
    with ExitStack() as stack:
        for s, (path, io) in modules.items():
            try:
                mod = handle.model.get_submodule(path)
            except AttributeError:
                near = difflib.get_close_matches(
                    path, [n for n, _ in handle.model.named_modules()], n=3)
                raise UnknownSiteError(f"no module {path!r} in the model; nearest: {near}"
                                       ) from None
            if io == "input":
                h = mod.register_forward_pre_hook(lambda m, args, s=s: keep(s, args[0]),
                                                  prepend=before_edits)
            else:
                h = mod.register_forward_hook(lambda m, args, o, s=s: keep(s, o),
                                              prepend=before_edits)
            stack.callback(h.remove)
        yield handle.model


_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def execution_order(model: torch.nn.Module, probe_token: int = 0) -> dict[tuple[str, str], int]:
    """When each module's input and output become available in a forward pass (cached per
    model): nnsight needs modules touched in this order."""
    if model in _ORDER:
        return _ORDER[model]
    events: dict[tuple[str, str], int] = {}

    def note(key):
        events.setdefault(key, len(events))  # returns None: the hook changes nothing

    hooks = []
    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: note((n, "input"))))
        hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: note((n, "output"))))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(input_ids=torch.tensor([[probe_token]], device=device))
    finally:
        for h in hooks:
            h.remove()
    _ORDER[model] = events
    return events


def _run_nnsight(handle: ModelHandle, sites: list[str], ids, mask, pos) -> dict:
    order = execution_order(handle.model, handle.tokenizer.pad_token_id or 0)
    modules = sorted(((s, *site_to_module(handle, s)) for s in sites),
                     key=lambda m: order.get((m[1], m[2]), 0))  # nnsight needs this order
    model, saved = handle.nnsight, {}
    with model.trace(input_ids=ids, attention_mask=mask, position_ids=pos) as tracer:
        for s, path, io in modules:
            mod = _nn_get(model, path)
            saved[s] = (mod.input if io == "input" else mod.output).save()
        tracer.stop()
    return {s: (v[0] if isinstance(v, tuple) else v) for s, v in saved.items()}


def _nn_get(model, path: str):
    obj = model
    for part in filter(None, path.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _pick_backend(sites: list[str], backend: str) -> str:
    module_paths = [s for s in sites if not is_hook_name(s)]
    if backend == "auto":
        return "torch" if len(module_paths) == len(sites) else "bridge"
    if backend == "bridge" and module_paths:
        raise ConfigError(f"HF module paths {module_paths} need backend 'torch' or 'nnsight'; "
                          "the bridge takes hook names such as blocks.0.hook_resid_post")
    return backend


@torch.no_grad()
def run_sites(handle: ModelHandle, sites: list[str], ids: torch.Tensor, mask: torch.Tensor,
              backend: str = "auto", before_edits: bool = False) -> dict[str, torch.Tensor]:
    """Activations at ``sites`` for one padded batch, stopping after the last site.

    Left padding is handled: position ids follow the attention mask. ``before_edits``
    (torch backend) reads each site before an edit already hooked on it (steering there)
    changes it: the state the model computed, not the one the edit passes on.
    """
    backend = _pick_backend(sites, backend)
    pos = handle.position_ids(mask)
    if backend == "nnsight":
        return _run_nnsight(handle, sites, ids, mask, pos)
    out: dict = {}
    with _recording(handle, sites, backend, out, before_edits) as model:
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        except _StopForward:
            pass
    missing = [s for s in sites if s not in out]
    if missing:
        raise RuntimeError(f"sites {missing} did not fire in a forward pass")
    return out


def site_module(handle: ModelHandle, site: str) -> tuple[torch.nn.Module, str]:
    """The HF module a site reads or changes, and ``"input"`` or ``"output"``."""
    path, io = site_to_module(handle, site)
    try:
        return handle.model.get_submodule(path), io
    except AttributeError:
        raise UnknownSiteError(f"site {site!r}: the model has no module {path!r}; module paths "
                               "look like 'model.layers.2.mlp.down_proj:input'") from None


class _Stop(Exception):
    pass


def _at_block(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, block: int,
              output: bool) -> torch.Tensor:
    """The hidden state entering (or, with ``output``, leaving) ``block``; the forward pass
    stops there."""
    layer = model.get_submodule(block_path(model))[block]
    seen = {}

    def entering(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    def leaving(module, args, out):
        seen["x"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    handle = (layer.register_forward_hook(leaving) if output
              else layer.register_forward_pre_hook(entering, with_kwargs=True))
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]


@torch.no_grad()
def block_input(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, block: int
                ) -> torch.Tensor:
    """The hidden state entering ``block`` [batch, pos, d]; the blocks from it up never
    run."""
    return _at_block(model, ids, mask, block, output=False)


def block_output(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, block: int
                 ) -> torch.Tensor:
    """The hidden state leaving ``block`` [batch, pos, d], with gradients where the
    parameters below it track them; the blocks above it never run."""
    return _at_block(model, ids, mask, block, output=True)
