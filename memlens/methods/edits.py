"""Weight edits as removals: new parameter values that change the model only inside
``with edit.apply(handle):``, and put the originals back bit-exactly on leaving it.

Every removal memlens has is an object with that one lazy ``apply(handle)`` context:
:class:`ParameterEdit` (a K-FAC edit, a balanced subnet), ``NormRemoval``, ``NeuronAblation``
and ``Steering``. :class:`WeightEdit` is the eager machinery beneath: it changes parameters
in place as it is told (so every view of the model sees them), remembers the originals, and
puts them back on ``restore()``. ``save`` writes an edited model as a new HF directory whose
``memlens_edit.json`` names the model it was edited from.

Example:
    >>> edit = ParameterEdit({"model.layers.3.mlp.down_proj": new_weight})
    >>> with edit.apply(handle):
    ...     print(edit_metrics(handle, canaries, heldout))
    >>> # original weights are back here
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers.pytorch_utils import Conv1D

from memlens.core.errors import ConfigError, UserError
from memlens.core.identity import Identity, state_hash, write_artifact
from memlens.core.model import ModelHandle
from memlens.core.modules import linear_modules
from memlens.core.storage import atomic_dir, exclusive, prepare_output

__all__ = ["ParameterEdit", "Removal", "WeightEdit"]


class Removal(Protocol):
    """Anything that removes memorized text while ``with removal.apply(handle):`` runs and
    leaves the model as it was afterwards."""

    def apply(self, handle: ModelHandle): ...


@dataclass
class ParameterEdit:
    """New values for some parameters: linear layers as [out, in(+1 bias)] matrices in
    ``weights`` (module name -> matrix, as :func:`~memlens.core.modules.linear_weight`
    gives), any other parameter in ``params``. Nothing changes until :meth:`apply`."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @contextmanager
    def apply(self, handle: ModelHandle) -> Iterator[WeightEdit]:
        """The model edited while the block runs; the originals back after, even on error."""
        edit = self.apply_now(handle)
        try:
            yield edit
        finally:
            edit.restore()

    def apply_now(self, handle: ModelHandle) -> WeightEdit:
        """The eager form: edit the model now; the returned :class:`WeightEdit` restores it."""
        edit = WeightEdit(handle)
        try:
            for name, weight in self.weights.items():
                edit.set_linear(name, weight.to(handle.device))
            for name, value in self.params.items():
                edit.set(name, value)
        except BaseException:
            edit.restore()
            raise
        return edit

    def save(self, handle: ModelHandle, out_dir: str | Path, metadata: dict | None = None
             ) -> Path:
        """Write the edited model to ``out_dir`` (see :meth:`WeightEdit.save`); ``handle``
        is left as it was."""
        with self.apply(handle) as edit:
            return edit.save(out_dir, metadata)


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
            raise UserError(f"no parameter {param_name!r} in {self.handle.name}")
        param = self._params[param_name]
        if tuple(value.shape) != tuple(param.shape):
            raise ConfigError(f"new value for {param_name!r} has shape {tuple(value.shape)}; "
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
            raise UserError(f"no linear layer {module_name!r} in {self.handle.name}")
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
        """Write the model as it is now (edited) as an HF directory, plus
        ``memlens_edit.json``: the edited parameters, ``metadata``, and an identity header
        (the edited weights' hash; ``inputs.model``: the unedited weights' hash)."""
        out = Path(out_dir)
        if out.resolve() == Path(self.handle.name).resolve():
            raise ConfigError(f"--out {out} is the model being edited; choose a new directory")
        prepare_output(out, "edit", marker="memlens_edit.json")
        base = state_hash({**self.handle.model.state_dict(), **self._originals})
        identity = Identity.make("edit", self.handle, config=metadata or {})
        identity = identity.with_changes(inputs={"model": base})
        with exclusive(out, "save an edited model"), atomic_dir(out) as tmp:
            self.handle.model.save_pretrained(tmp)
            self.handle.tokenizer.save_pretrained(tmp)
            write_artifact(tmp, "memlens_edit.json", {
                "base_model": self.handle.name, "edited_parameters": self.edited,
                **(metadata or {})}, identity)
        return out

    def __enter__(self) -> WeightEdit:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
