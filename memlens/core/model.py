"""One handle on a Hugging Face causal LM: the HF module, a TransformerLens view, an nnsight view.

All three views share the same parameter tensors; nothing is copied.

Example:
    >>> handle = load_model("path/to/model_dir")
    >>> handle.bridge.run_with_cache("Hello")            # TransformerLens hook names
    >>> with handle.nnsight.trace("Hello"): ...           # nnsight module paths
    >>> ids, mask = handle.pad([[1, 2, 3], [4, 5]], side="left")
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError

from memlens.core.config import Config, option
from memlens.core.errors import ConfigError, DataError, ModelLoadError
from memlens.core.identity import weights_hash
from memlens.core.packaged import PACKAGED, packaged_model_path

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelHandle", "ModelOptions", "load_model"]

# model_type -> what users know it as. Other causal LMs load with allow_untested=True.
SUPPORTED_ARCHITECTURES = {
    "gpt_neox": "GPT-NeoX / Pythia",
    "gpt2": "GPT-2",
    "llama": "Llama",
    "olmo2": "OLMo-2",
    "opt": "OPT",
}


def _looks_like_path(name: str) -> bool:
    """Hub names are ``org/name``; anything else that could be a directory is treated as one."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) \
        or name.count("/") > 1


def _shared_structure_copy(model: torch.nn.Module) -> torch.nn.Module:
    """New module objects over the same parameter and buffer tensors.

    The bridge swaps submodules for its wrappers in place; giving it this copy keeps
    ``handle.model`` a plain HF module tree (stable nnsight paths, no stray hooks) while
    in-place weight edits stay visible to every view.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


@dataclass(repr=False)
class ModelHandle:
    """A causal LM with its tokenizer, and lazily built interpretability views of it.

    Edit weights in place (``param.data.copy_(...)``) so that every view sees the edit.
    One exception: for fused QKV projections (GPT-2, GPT-NeoX) TransformerLens keeps split
    copies of q/k/v; call :meth:`reset_views` after editing those.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    trust_remote_code: bool = False

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or under a ``device_map`` the
        device the input embedding runs on (its weights may be offloaded)."""
        for module in (self.model.get_input_embeddings(), self.model):
            hook = getattr(module, "_hf_hook", None)  # accelerate's, from a device_map
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config

    def __repr__(self) -> str:
        cfg = self.model.config
        n = sum(p.numel() for p in self.model.parameters())
        dtype = next(self.model.parameters()).dtype
        return (f"ModelHandle({self.name!r}: {cfg.model_type}, {n / 1e6:.2f}M parameters, "
                f"{self.n_layers} blocks, d_model {cfg.hidden_size}, "
                f"{str(dtype).removeprefix('torch.')} on {self.device})")

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes, where its config says (learned positions)."""
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @cached_property
    def bridge(self):
        """A TransformerLens ``TransformerBridge`` over the same weights (canonical hook names)."""
        from transformer_lens.model_bridge import TransformerBridge

        cfg = self.model.config
        if cfg.model_type == "opt" and not getattr(cfg, "do_layer_norm_before", True):
            # It builds, then fails inside OPT attention on the first forward pass.
            raise ModelLoadError(
                f"TransformerLens' bridge does not run Post-LN OPT ({self.name!r} has "
                "do_layer_norm_before=False). Use handle.nnsight, or module paths such as "
                "'model.decoder.layers.0.final_layer_norm' as sites (plain PyTorch hooks).")
        try:
            return TransformerBridge.boot_transformers(
                self.name, hf_model=_shared_structure_copy(self.model), tokenizer=self.tokenizer,
                device=str(self.device), dtype=next(self.model.parameters()).dtype,
                trust_remote_code=self.trust_remote_code)
        except Exception as exc:
            raise ModelLoadError(
                f"TransformerLens could not wrap {self.name!r} "
                f"(architecture {self.model.config.architectures}): {exc}. "
                "Use handle.nnsight or plain PyTorch hooks on handle.model instead."
            ) from exc

    @cached_property
    def nnsight(self):
        """An nnsight wrapper over the same module (module paths such as ``model.layers.0.mlp``)."""
        from nnsight import NNsight

        return NNsight(self.model)

    def reset_views(self) -> None:
        """Drop the bridge and nnsight views; they are rebuilt from the weights on next use."""
        self.__dict__.pop("bridge", None)
        self.__dict__.pop("nnsight", None)

    def pad(self, sequences: list[list[int]], side: str = "right"
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad token-id lists into ``(input_ids, attention_mask)``, both [batch, pos]."""
        if side not in ("left", "right"):
            raise ConfigError(f"padding side must be 'left' or 'right', got {side!r}")
        width = max(map(len, sequences))
        if self.max_positions is not None and width > self.max_positions:
            raise DataError(f"a sequence of {width} tokens is longer than the {self.max_positions}"
                            f" positions {self.name} takes; cut sequences to at most that many "
                            f"tokens (--max-len {self.max_positions})")
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            sl = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[i, sl] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def tokenize(self, texts: str | list[str], side: str = "right", max_length: int | None = None):
        """Tokenize texts into padded ``input_ids`` and ``attention_mask`` on the model's device."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.tokenizer(t)["input_ids"][:max_length] for t in texts]
        return self.pad(ids, side)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that ignore left padding, so padded rows match unpadded runs."""
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def weights_hash(self) -> str:
        """A short hash of every parameter: the model's identity in artifacts."""
        return weights_hash(self.model)


def load_model(name_or_path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, trust_remote_code: bool = False,
               allow_untested: bool = False, attn_implementation: str = "eager",
               device_map: str | dict | None = None, max_memory: dict | None = None
               ) -> ModelHandle:
    """Load a causal LM and its tokenizer from a local directory, a hub name, or the name
    of a model memlens knows how to build from an installed package (``"smollm2-135m"``).

    ``attn_implementation="eager"`` keeps the HF view numerically identical to the
    TransformerLens view (which forces eager attention); pass ``"sdpa"`` for speed.
    ``device_map`` (e.g. ``"auto"``, needs ``accelerate``) spreads a model too large for one
    device over several, each holding at most its ``max_memory`` entry (``{0: "20GiB",
    "cpu": "60GiB"}``); ``device`` is then ignored.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name in PACKAGED and not Path(name).is_dir():  # a model shipped in a package
        name = str(packaged_model_path(name))
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory {name!r} does not exist; pass a directory "
                                 "holding config.json, or train one: memlens organism train")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{name!r} has no config.json; it is not a Hugging Face model "
                                 "directory (save one with model.save_pretrained(dir))")
        name = str(path.resolve())
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"could not load a model config for {name!r}: {exc}. "
            + ("HF_HUB_OFFLINE=1 is set, so only local directories and cached models load. "
               if offline else "Check the hub name. ")
            + "If you meant a local directory, it does not exist.") from exc
    if config.model_type not in SUPPORTED_ARCHITECTURES and not allow_untested:
        listed = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise ModelLoadError(
            f"architecture {config.model_type!r} of {name!r} is not one memlens is tested on: "
            f"{listed}. Pass allow_untested=True to try it anyway.")
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ModelLoadError(f"device_map={device_map!r} needs the accelerate package: "
                                 "pip install accelerate") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, device_map=device_map,
            max_memory=max_memory, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"the weights of {name!r} could not be read ({exc}); they are "
                             "missing, truncated or not a model's: save the model again") from exc
    missing = [k for k in info["missing_keys"] if "rotary" not in k]
    if missing:
        raise ModelLoadError(
            f"{len(missing)} weights of {name!r} are missing from its files (e.g. "
            f"{missing[0]!r}); loading would leave them random. Save the model again "
            "(model.save_pretrained) or point at the right directory.")
    model = (model if device_map is not None else model.to(device)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no tokenizer could be loaded from {name!r}: {exc}. "
                             "Save the tokenizer beside the model (tokenizer.save_pretrained)."
                             ) from exc
    n_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_rows:
        raise ModelLoadError(
            f"the tokenizer of {name!r} has {len(tokenizer)} tokens but the model's embedding "
            f"has {n_rows} rows: they do not belong together. Use the tokenizer the model was "
            "trained with.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    handle = ModelHandle(model, tokenizer, name, trust_remote_code)
    _check_recorded_hash(handle)
    return handle


def _check_recorded_hash(handle: ModelHandle) -> None:
    """Directories memlens wrote (organisms, edited models) record their weights' hash:
    refuse weights that no longer match it (a flipped byte changes what a model recites)."""
    path = Path(handle.name)
    recorded = None
    for name, key in (("memlens.json", "weights_hash"), ("memlens_edit.json", "identity")):
        if (path / name).is_file():
            meta = json.loads((path / name).read_text())
            value = meta.get(key)
            recorded = value.get("model_hash") if isinstance(value, dict) else value
    if recorded and recorded != handle.weights_hash():
        raise ModelLoadError(f"the weights in {path} do not match the hash memlens recorded "
                             f"when it wrote them ({recorded}): the files were corrupted or "
                             "changed. Train or edit the model again.")


@dataclass
class ModelOptions(Config):
    """Which model a step runs, and where."""

    model: str | None = option(None, "model directory, hub name, or smollm2-135m")
    device: str = option("auto", "cpu, cuda, cuda:1 ... or auto (this rank's GPU if "
                         "there is one, else the CPU)")
    model_dtype: str = option("auto", "the weights' dtype (auto: as saved)",
                              choices=("auto", "float32", "bfloat16", "float16"))
    device_map: str | None = option(None, "'auto' spreads a model too large for one device "
                                    "over the GPUs (and CPU); needs accelerate")
    max_memory: tuple[str, ...] | None = option(None, "with --device-map: the most each "
                                                "device may hold, e.g. 0=20GiB cpu=60GiB")

    def load(self, name: str | Path | None = None) -> ModelHandle:
        """The model ``name`` (default: this config's ``model``), placed as configured."""
        from memlens.core import distributed

        name = name or self.model
        if name is None:
            raise ConfigError("no model given: pass --model (a model directory, a hub name "
                              "or smollm2-135m)")
        max_memory = None
        if self.max_memory:
            if self.device_map is None:
                raise ConfigError("--max-memory only applies with --device-map auto")
            max_memory = {}
            for item in self.max_memory:
                key, sep, size = item.partition("=")
                if not sep or not size:
                    raise ConfigError(f"--max-memory {item!r}: write DEVICE=SIZE, e.g. "
                                      "0=20GiB or cpu=60GiB")
                max_memory[int(key) if key.isdigit() else key] = size
        if self.device_map is not None and distributed.active():
            raise ConfigError("--device-map spreads one model over several devices, and "
                              "under torchrun every rank holds its own copy: use one or the "
                              "other")
        dtype = None if self.model_dtype == "auto" else getattr(torch, self.model_dtype)
        return load_model(name, device=distributed.device(self.device), dtype=dtype,
                          device_map=self.device_map, max_memory=max_memory)
