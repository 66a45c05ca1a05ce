"""Where things are in a Hugging Face causal LM: blocks, linear layers, MLP neurons, norms.

Works on any architecture by module type and name, not by a support list. Also the two
contexts every gradient-based method runs in.

Example:
    >>> find_layers(handle.model, "mlp")            # every MLP projection, by module name
    >>> neuron_sites(handle.model)                   # 'model.layers.0.mlp.down_proj:input', ...
    >>> norm_modules(handle.model, [0, 1])           # the norms inside blocks 0 and 1
    >>> with tracking_gradients(handle.model, []):   # activation gradients only
    ...     ...
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch

import torch
from transformers.pytorch_utils import Conv1D

from memlens.core.errors import ConfigError

__all__ = ["PLAIN_EMBEDDING", "block_parameters", "block_path", "final_norm", "find_layers",
           "flush_denormals", "freeze_norm_params", "identity_norm_params", "is_norm",
           "linear_modules", "linear_weight", "mlp_output_layers", "neuron_sites", "neuron_width",
           "norm_modules", "only_top_blocks", "tracking_gradients"]

_MLP = re.compile(r"(^|\.)(mlp|fc1|fc2)(\.|$)")
_ATTN = re.compile(r"(attn|attention)")


# --------------------------------------------------------------------------- linear layers


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every ``nn.Linear`` and HF ``Conv1D`` (GPT-2) in the model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def find_layers(model: torch.nn.Module, layers: tuple[str, ...] | str = ("mlp",)) -> list[str]:
    """Names of linear layers in the blocks: ``"mlp"`` (every MLP projection), ``"attn"``
    (attention projections) or module-name globs such as ``"model.layers.3.mlp.*"``."""
    layers = (layers,) if isinstance(layers, str) else layers
    candidates = {n: m for n, m in linear_modules(model).items()
                  if not n.endswith("lm_head") and "embed" not in n}
    names = []
    for name in candidates:
        kind = "mlp" if _MLP.search(name) else "attn" if _ATTN.search(name) else None
        if any(pat == kind or fnmatch(name, pat) for pat in layers):
            names.append(name)
    if not names:
        example = next(iter(candidates), "model.layers.0.mlp.up_proj")
        raise ConfigError(f"no linear layer matches {list(layers)}; use 'mlp', 'attn' or a "
                          f"module-name glob such as {example!r}")
    return names


def linear_weight(module: torch.nn.Module, values: dict[int, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """The layer's map as one fp32 matrix [out, in], with the bias as an extra last column.

    HF ``Conv1D`` stores its weight as [in, out]; it is transposed here, so every layer reads
    ``y = W @ [x; 1]``. ``values`` (by ``id(parameter)``) lays out other tensors shaped like
    the parameters, such as their gradients, the same way.
    """
    def get(p):
        return (values[id(p)] if values is not None else p).detach()

    w = get(module.weight)
    w = w.T if isinstance(module, Conv1D) else w
    if module.bias is not None:
        w = torch.cat([w, get(module.bias)[:, None]], dim=1)
    return w.float()


def mlp_output_layers(model: torch.nn.Module) -> list[str]:
    """Per block, the MLP projection back to the residual stream (down_proj, c_proj, fc2...):
    its input holds the MLP neurons."""
    d_model = model.config.hidden_size
    modules = linear_modules(model)
    return [n for n in find_layers(model, "mlp") if linear_weight(modules[n]).shape[0] == d_model]


def neuron_sites(model: torch.nn.Module) -> list[str]:
    """One site per block: the input of the MLP output projection (its units are neurons)."""
    return [f"{name}:input" for name in mlp_output_layers(model)]


def neuron_width(model: torch.nn.Module) -> int:
    """Neurons per block (d_mlp): the input width of the MLP output projection."""
    module = linear_modules(model)[mlp_output_layers(model)[0]]
    return linear_weight(module).shape[1] - (module.bias is not None)


# --------------------------------------------------------------------------- blocks and norms


def block_path(model: torch.nn.Module) -> str:
    """Module path of the decoder's list of blocks (``model.layers``, ``transformer.h``...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name
    raise ConfigError(f"{type(model).__name__} has no list of {n} blocks")


def block_parameters(model: torch.nn.Module, blocks: list[int] | tuple[int, ...]
                     ) -> dict[str, torch.nn.Parameter]:
    """The parameters of blocks ``blocks`` and of the norms outside any block (the final
    norm), by name: what trains when only those blocks are trained."""
    root = block_path(model)
    n = model.config.num_hidden_layers
    bad = [i for i in blocks if not 0 <= i < n]
    if bad:
        raise ConfigError(f"blocks {bad} do not exist; the model has blocks 0..{n - 1}")
    keep = tuple(f"{root}.{i}." for i in blocks) + tuple(
        f"{path}." for path, module in model.named_modules()
        if is_norm(module) and not path.startswith(root))
    return {name: p for name, p in model.named_parameters() if name.startswith(keep)}


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm between the last block and the unembedding (``model.norm``,
    ``transformer.ln_f``...), or None where there is none (a Post-LN decoder)."""
    root = block_path(model)
    after = [m for path, m in model.named_modules()
             if is_norm(m) and path and not path.startswith(root) and "emb" not in path]
    return after[-1] if after else None


# Architectures whose blocks take the token embedding as it is (no position embedding added,
# no scale): the top blocks can run from a saved block input passed as ``inputs_embeds``.
PLAIN_EMBEDDING = ("llama", "olmo2", "mistral", "qwen2")


@contextmanager
def only_top_blocks(model: torch.nn.Module, k: int) -> Iterator[None]:
    """While the block runs the model has only its top ``k`` blocks: call it with
    ``inputs_embeds`` = the hidden state entering block ``n - k``
    (:func:`memlens.core.sites.block_input`) and it returns the full model's logits, at the
    cost of those blocks and the head."""
    if model.config.model_type not in PLAIN_EMBEDDING:
        raise ConfigError(f"only_top_blocks needs blocks that take the token embedding as it "
                          f"is ({', '.join(PLAIN_EMBEDDING)}); {model.config.model_type} "
                          "adds position embeddings: run the whole model")
    path = block_path(model)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList(list(blocks)[len(blocks) - k:]))
    try:
        yield
    finally:
        setattr(parent, name, blocks)


def is_norm(module: torch.nn.Module) -> bool:
    """A LayerNorm or RMSNorm (any class named *Norm*) with a gain."""
    return "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None


def norm_modules(model: torch.nn.Module, layers: list[int] | tuple[int, ...] | None = None
                 ) -> dict[str, torch.nn.Module]:
    """The normalization layers inside blocks ``layers`` (every block when None), by path.

    The final norm after the last block belongs to no block and is never included.
    """
    root = block_path(model)
    n = model.config.num_hidden_layers
    layers = range(n) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"blocks {bad} do not exist; the model has blocks 0..{n - 1}")
    found = {}
    for i in layers:
        prefix = f"{root}.{i}"
        for name, module in model.get_submodule(prefix).named_modules():
            if is_norm(module):
                found[f"{prefix}.{name}"] = module
    return found


def identity_norm_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gain 1 and (where there is one) bias 0 for a norm: its parameters "removed"."""
    out = {"weight": torch.ones_like(module.weight)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = torch.zeros_like(module.bias)
    return out


@torch.no_grad()
def freeze_norm_params(model: torch.nn.Module, layers: tuple[int, ...]) -> list[str]:
    """Set the norms of blocks ``layers`` to gain 1, bias 0 and stop them training."""
    names = []
    for path, module in norm_modules(model, layers).items():
        for pname, value in identity_norm_params(module).items():
            param = getattr(module, pname)
            param.copy_(value)
            param.requires_grad_(False)
            names.append(f"{path}.{pname}")
    return names


# --------------------------------------------------------------------------- contexts


@contextmanager
def tracking_gradients(model: torch.nn.Module,
                       params: list[torch.nn.Parameter] | None = None) -> Iterator[None]:
    """Inside the block: gradients on, eval mode, and only ``params`` (every parameter when
    None; pass [] to freeze them all) require grad. Everything is put back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = None if params is None else {id(p) for p in params}
    was_training = model.training
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(chosen is None or id(p) in chosen)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while the block runs. Optimizer states of tiny masked
    gradients go denormal, and CPU arithmetic on denormals is 10x+ slower."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
