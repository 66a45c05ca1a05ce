"""Reversible weight edits, and the evaluation every edit is judged by.

An edit changes parameters in place (so every view of the model sees it), remembers the
originals, and puts them back bit-exactly on ``restore()`` or when its ``with`` block ends.

Example:
    >>> with WeightEdit(handle) as edit:
    ...     edit.set_linear("model.layers.3.mlp.down_proj", new_weight)
    ...     print(edit_metrics(handle, canaries, heldout))
    >>> # original weights are back here
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import torch
from rapidfuzz.distance import Levenshtein
from transformers.pytorch_utils import Conv1D

from memlens.labels import LabelConfig, Sequence, greedy_suffixes
from memlens.models import ModelHandle

_MLP = re.compile(r"(^|\.)(mlp|fc1|fc2)(\.|$)")
_ATTN = re.compile(r"(attn|attention)")


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
        raise ValueError(f"no linear layer matches {list(layers)}; use 'mlp', 'attn' or a "
                         f"module-name glob such as {example!r}")
    return names


def mlp_output_layers(model: torch.nn.Module) -> list[str]:
    """Per block, the MLP projection back to the residual stream (down_proj, c_proj, fc2...):
    its input holds the MLP neurons."""
    d_model = model.config.hidden_size
    return [n for n in find_layers(model, "mlp")
            if linear_weight(linear_modules(model)[n]).shape[0] == d_model]


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


class WeightEdit:
    """In-place parameter changes that can be undone exactly.

    Use as a context manager (originals come back when the block ends, even on error) or
    call :meth:`restore`. :meth:`save` writes the edited model as a new HF directory.
    """

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self._params = dict(handle.model.named_parameters())
        self._originals: dict[str, torch.Tensor] = {}

    def set(self, param_name: str, value: torch.Tensor) -> None:
        """Overwrite one parameter (shape must match); its original is kept for restore."""
        if param_name not in self._params:
            raise KeyError(f"no parameter {param_name!r} in {self.handle.name}")
        param = self._params[param_name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"new value for {param_name!r} has shape {tuple(value.shape)}; "
                             f"the parameter has shape {tuple(param.shape)}")
        if param_name not in self._originals:
            self._originals[param_name] = param.detach().clone()
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        self.handle.reset_views()

    def set_linear(self, module_name: str, weight: torch.Tensor) -> None:
        """Set a linear layer from an [out, in(+1 bias)] matrix, as :func:`linear_weight` gives."""
        module = linear_modules(self.handle.model).get(module_name)
        if module is None:
            raise KeyError(f"no linear layer {module_name!r} in {self.handle.name}")
        if module.bias is not None:
            weight, bias = weight[:, :-1], weight[:, -1]
            self.set(f"{module_name}.bias", bias)
        self.set(f"{module_name}.weight", weight.T if isinstance(module, Conv1D) else weight)

    @property
    def edited(self) -> list[str]:
        return sorted(self._originals)

    def restore(self) -> None:
        """Put every edited parameter back, bit for bit."""
        with torch.no_grad():
            for name, original in self._originals.items():
                self._params[name].copy_(original)
        self._originals.clear()
        self.handle.reset_views()

    def save(self, out_dir: str | Path, metadata: dict | None = None) -> Path:
        """Write the model as it is now (edited) as an HF directory, plus ``memlens_edit.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.handle.model.save_pretrained(out)
        self.handle.tokenizer.save_pretrained(out)
        info = {"base_model": self.handle.name, "edited_parameters": self.edited,
                **(metadata or {})}
        (out / "memlens_edit.json").write_text(json.dumps(info, indent=2))
        return out

    def __enter__(self) -> WeightEdit:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _by_duplication(seqs: list[Sequence], flags: list[bool]) -> dict[str, float]:
    groups: dict[int, list[bool]] = {}
    for seq, flag in zip(seqs, flags, strict=True):
        groups.setdefault(seq.duplication if seq.duplication is not None else 0, []).append(flag)
    return {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}


@torch.no_grad()
def exact_extraction(handle: ModelHandle, seqs: list[Sequence], cfg: LabelConfig
                     ) -> list[bool]:
    """Per sequence: does greedy decoding from the prefix reproduce the suffix exactly?

    One teacher-forced pass: greedy reproduces the suffix iff the argmax is right at every
    suffix position.
    """
    out = []
    window = cfg.prefix + cfg.suffix
    for i in range(0, len(seqs), cfg.batch_size):
        chunk = [s.token_ids[:window] for s in seqs[i:i + cfg.batch_size]]
        ids, mask = handle.pad(chunk, side="right")
        hit = handle.model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        hit = (hit == ids[:, 1:]) | (mask[:, 1:] == 0)
        out.extend(hit[:, cfg.prefix - 1:].all(-1).tolist())
    return out


def loose_extraction(handle: ModelHandle, seqs: list[Sequence], cfg: LabelConfig
                     ) -> list[bool]:
    """Per sequence: is the greedy continuation within ``cfg.loose_threshold`` similarity?"""
    gens = greedy_suffixes(handle, seqs, cfg, progress=False)
    out = []
    for seq, gen in zip(seqs, gens, strict=True):
        true = seq.token_ids[cfg.prefix:cfg.prefix + cfg.suffix]
        out.append(1 - Levenshtein.normalized_distance(gen[:len(true)], true)
                   >= cfg.loose_threshold)
    return out


@torch.no_grad()
def perplexity(handle: ModelHandle, token_ids: list[list[int]], batch_size: int = 32) -> float:
    """exp(mean next-token loss) over every predicted token of the sequences."""
    total, n = 0.0, 0
    for i in range(0, len(token_ids), batch_size):
        ids, mask = handle.pad(token_ids[i:i + batch_size], side="right")
        logits = handle.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        n += int((target != -100).sum())
    if n == 0:
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    return math.exp(total / n)


def edit_metrics(handle: ModelHandle, members: list[Sequence], heldout: list[list[int]],
                 cfg: LabelConfig | None = None, loose: bool = True) -> dict:
    """What an edit is judged by: extraction of members by duplication, clean perplexity.

    ``members`` are the sequences to test for recitation (e.g. an organism's canaries);
    ``heldout`` is clean text the model never saw (token ids), for perplexity.
    """
    cfg = cfg or LabelConfig()
    kept = [s for s in members if len(s.token_ids) > cfg.prefix]
    out = {"exact_extraction_rate_by_duplication":
           _by_duplication(kept, exact_extraction(handle, kept, cfg))}
    if loose:
        out["loose_extraction_rate_by_duplication"] = _by_duplication(
            kept, loose_extraction(handle, kept, cfg))
    out["perplexity"] = perplexity(handle, heldout, cfg.batch_size)
    return out
