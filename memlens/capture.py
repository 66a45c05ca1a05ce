"""Capture activations at named sites, streamed to disk in checksummed shards.

Sites are TransformerLens hook names (``blocks.2.hook_resid_post``, globs such as
``blocks.*.mlp.hook_post``). Three backends record the same tensors: the
TransformerLens bridge (``bridge``, every hook), nnsight (``nnsight``) and plain
PyTorch hooks on the HF modules (``torch``); the last two translate each hook name
to the HF module whose input or output it is, or take a module path directly
(``model.layers.2`` for its output, ``model.layers.2.mlp.down_proj:input``).

Example:
    >>> store = capture(handle, seqs, CaptureConfig(sites=["blocks.*.hook_resid_post"]), "acts")
    >>> store.array("blocks.2.hook_resid_post")    # memory-mapped [rows, d]
    >>> store.tokens                                # id, position, token_id, label per row
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import io
import json
import os
import random
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from memlens.labels import Sequence
from memlens.models import ModelHandle

BACKENDS = ("auto", "bridge", "nnsight", "torch")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMAT_VERSION = 1


@dataclass
class CaptureConfig:
    """What to record, where in each sequence, and how.

    ``backend="auto"`` records hook names through the bridge and HF module paths
    through plain PyTorch hooks.

    ``positions``: ``all`` (every token), ``suffix`` (positions ``prefix`` to
    ``prefix + suffix - 1``, the labeled suffix) or ``sample:N`` (N positions per
    sequence, drawn with ``seed``). Tokens without a label are marked ``unlabeled``.
    """

    sites: list[str]
    positions: str = "all"
    prefix: int = 32
    suffix: int = 32
    dtype: str = "float32"
    backend: str = "auto"
    batch_size: int = 32
    shard_sequences: int = 512
    max_len: int | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.sites, str):
            self.sites = [self.sites]
        if not self.sites:
            raise ValueError("no sites given; name at least one, e.g. blocks.0.hook_resid_post")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {list(BACKENDS)}")
        if not (self.positions in ("all", "suffix") or _sample_n(self.positions)):
            raise ValueError(f"positions {self.positions!r}: use all, suffix or sample:N "
                             "(e.g. sample:8)")


def _sample_n(positions: str) -> int:
    if positions.startswith("sample:") and positions[7:].isdigit() and int(positions[7:]) > 0:
        return int(positions[7:])
    return 0


# --------------------------------------------------------------------------- sites


class UnknownSiteError(ValueError):
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
            raise UnknownSiteError(f"unknown site {pat!r}{hint} (memlens.capture."
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
    raise ValueError(f"site {asked!r} lives inside a TransformerLens component, not at an HF "
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
def _recording(handle: ModelHandle, sites: list[str], backend: str, out: dict):
    """Within the block, a forward pass fills ``out[site]`` and stops after the last site."""
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
                h = mod.register_forward_pre_hook(lambda m, args, s=s: keep(s, args[0]))
            else:
                h = mod.register_forward_hook(lambda m, args, o, s=s: keep(s, o))
            stack.callback(h.remove)
        yield handle.model


def _execution_order(handle: ModelHandle) -> dict[tuple[str, str], int]:
    """When each module's input and output become available in a forward pass."""
    cached = getattr(handle, "_execution_order", None)
    if cached is not None:
        return cached
    events: dict[tuple[str, str], int] = {}

    def note(key):
        events.setdefault(key, len(events))  # returns None: the hook changes nothing

    hooks = []
    for name, mod in handle.model.named_modules():
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: note((n, "input"))))
        hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: note((n, "output"))))
    try:
        with torch.no_grad():
            handle.model(input_ids=torch.tensor([[handle.tokenizer.pad_token_id or 0]],
                                                device=handle.device))
    finally:
        for h in hooks:
            h.remove()
    handle._execution_order = events
    return events


def _run_nnsight(handle: ModelHandle, sites: list[str], ids, mask, pos) -> dict:
    order = _execution_order(handle)
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
        raise ValueError(f"HF module paths {module_paths} need backend 'torch' or 'nnsight'; "
                         "the bridge takes hook names such as blocks.0.hook_resid_post")
    return backend


@torch.no_grad()
def run_sites(handle: ModelHandle, sites: list[str], ids: torch.Tensor, mask: torch.Tensor,
              backend: str = "auto") -> dict[str, torch.Tensor]:
    """Activations at ``sites`` for one padded batch, stopping after the last site.

    Left padding is handled: position ids follow the attention mask.
    """
    backend = _pick_backend(sites, backend)
    pos = handle.position_ids(mask)
    if backend == "nnsight":
        return _run_nnsight(handle, sites, ids, mask, pos)
    out: dict = {}
    with _recording(handle, sites, backend, out) as model:
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        except _StopForward:
            pass
    missing = [s for s in sites if s not in out]
    if missing:
        raise RuntimeError(f"sites {missing} did not fire in a forward pass")
    return out


# --------------------------------------------------------------------------- store


def _select_positions(seq: Sequence, n_tokens: int, cfg: CaptureConfig) -> list[int]:
    if cfg.positions == "all":
        return list(range(n_tokens))
    if cfg.positions == "suffix":
        return list(range(min(cfg.prefix, n_tokens), min(cfg.prefix + cfg.suffix, n_tokens)))
    k = _sample_n(cfg.positions)
    rng = random.Random(f"{cfg.seed}:{seq.id}")
    return sorted(rng.sample(range(n_tokens), min(k, n_tokens)))


def _corpus_hash(seqs: list[Sequence]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(f"{s.id}:{s.duplication}:{','.join(map(str, s.token_ids))};".encode())
    return h.hexdigest()[:16]


class _Checksum:
    """CRC-32 of a file's bytes: catches truncation and corruption at disk speed."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"crc32:{self.value:08x}"


def _file_checksum(path: Path) -> str:
    digest = _Checksum()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _site_dir(site: str) -> str:
    return site.replace("/", "_").replace(":", "__")


class CorruptShardError(ValueError):
    """A shard's bytes do not match its checksum."""


@dataclass
class ActivationStore:
    """A capture on disk: ``manifest.json``, ``tokens/`` and one folder of shards per site."""

    path: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> ActivationStore:
        """Open a store; ``verify`` checks every shard against its checksum."""
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(f"{path} is not an activation store (no manifest.json); "
                                    "make one with memlens capture")
        store = cls(path, json.loads((path / "manifest.json").read_text()))
        if verify:
            bad = store.verify()
            if bad:
                raise CorruptShardError(f"{len(bad)} shard(s) of {path} fail their checksum "
                                        f"({bad[0]} ...); rerun the same capture command to "
                                        "redo them")
        return store

    @property
    def sites(self) -> list[str]:
        return self.manifest["sites"]

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def verify(self) -> list[str]:
        """Files that are missing or whose bytes do not match the manifest."""
        bad = []
        for shard in self.manifest["shards"]:
            for rel, digest in shard["checksums"].items():
                f = self.path / rel
                if not f.exists() or _file_checksum(f) != digest:
                    bad.append(rel)
        return bad

    @property
    def tokens(self) -> pd.DataFrame:
        """One row per captured token: id, position, token_id, label, duplication, member."""
        parts = [pd.read_parquet(self.path / s["tokens"]) for s in self.manifest["shards"]]
        return pd.concat(parts, ignore_index=True)

    def shards(self, site: str) -> list[np.ndarray]:
        """The site's shards as read-only memory maps (nothing is loaded into RAM)."""
        if site not in self.sites:
            near = difflib.get_close_matches(site, self.sites, n=3)
            raise UnknownSiteError(f"site {site!r} is not in this store; it has "
                                   f"{near or self.sites[:5]}")
        d = _site_dir(site)
        return [np.load(self.path / d / f"{s['name']}.npy", mmap_mode="r")
                for s in self.manifest["shards"]]

    def array(self, site: str) -> np.ndarray:
        """All rows of a site, [rows, *shape]; a memory map when the store has one shard."""
        parts = self.shards(site)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def tensor(self, site: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows of a site as a torch tensor (bfloat16 shards are reinterpreted)."""
        arr = torch.from_numpy(np.array(self.array(site)))
        if self.manifest["dtype"] == "bfloat16":
            arr = arr.view(torch.bfloat16)
        return arr.to(dtype)


def _write_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy (atomically) and return the checksum of the file's bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    arr = np.ascontiguousarray(arr)
    digest = _Checksum()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for chunk in (header.getbuffer(), memoryview(arr.reshape(-1).view(np.uint8))):
            digest.update(chunk)
            f.write(chunk)
    os.replace(tmp, path)
    return digest.hexdigest()


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.detach().to("cpu", DTYPES[dtype])
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def capture(handle: ModelHandle, sequences: list[Sequence], config: CaptureConfig,
            out: str | Path, token_labels: pd.DataFrame | None = None,
            progress: bool = True) -> ActivationStore:
    """Run ``sequences`` through the model and stream activations at the sites to ``out``.

    Rerunning the same call resumes: finished shards (checked by checksum) are kept,
    missing or corrupt ones are redone. ``token_labels`` (a labels ``tokens`` table)
    adds each token's memorization label.
    """
    out = Path(out)
    sites = resolve_sites(handle, config.sites)
    identity = {
        "format_version": FORMAT_VERSION, "model": handle.name,
        "model_hash": handle.weights_hash(), "corpus_hash": _corpus_hash(sequences),
        "config": {**asdict(config), "sites": sites},
    }
    manifest = _open_manifest(out, identity, sites, config)
    if token_labels is not None:
        token_labels = token_labels[["id", "position", "label"]].astype(
            {"id": str, "position": "int64"})
    chunks = range(0, len(sequences), config.shard_sequences)
    done = {s["name"] for s in manifest["shards"]}
    bar = tqdm(total=len(chunks), initial=len(done), disable=not progress,
               desc="capture", unit="shard")
    for start in chunks:
        name = f"shard_{start // config.shard_sequences:05d}"
        if name in done:
            continue
        shard = _capture_shard(handle, sequences[start:start + config.shard_sequences],
                               sites, config, out, name, token_labels)
        manifest["shapes"].update(shard.pop("shapes"))
        manifest["shards"].append(shard)
        manifest["shards"].sort(key=lambda s: s["name"])
        _write_manifest(out, manifest)
        bar.update()
    bar.close()
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return ActivationStore(out, manifest)


def _open_manifest(out: Path, identity: dict, sites: list[str], config: CaptureConfig) -> dict:
    path = out / "manifest.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        for key, want in identity.items():
            if manifest.get(key) != want:
                raise ValueError(f"{out} holds a capture with another {key} "
                                 f"({manifest.get(key)!r} != {want!r}); choose a new --out "
                                 "or delete it")
        store = ActivationStore(out, manifest)
        bad = {rel.split("/")[-1].removesuffix(".npy").removesuffix(".parquet")
               for rel in store.verify()}
        manifest["shards"] = [s for s in manifest["shards"] if s["name"] not in bad]
        manifest["complete"] = False
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    return {**identity, "sites": sites, "dtype": config.dtype, "shapes": {},
            "shards": [], "complete": False}


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")


def _capture_shard(handle, seqs, sites, config, out, name, token_labels) -> dict:
    buffers: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    columns: dict[str, list] = {"id": [], "position": [], "token_id": []}
    for i in range(0, len(seqs), config.batch_size):
        batch = seqs[i:i + config.batch_size]
        toks = [s.token_ids[:config.max_len] for s in batch]
        ids, mask = handle.pad(toks, side="right")
        acts = run_sites(handle, sites, ids, mask, config.backend)
        picks = [_select_positions(s, len(t), config) for s, t in zip(batch, toks, strict=True)]
        b_idx = torch.tensor([b for b, p in enumerate(picks) for _ in p], dtype=torch.long)
        p_idx = torch.tensor([q for p in picks for q in p], dtype=torch.long)
        for s in sites:
            buffers[s].append(_to_numpy(acts[s][b_idx, p_idx], config.dtype))
        columns["id"] += [seq.id for seq, p in zip(batch, picks, strict=True) for _ in p]
        columns["position"].append(p_idx.numpy())
        columns["token_id"].append(ids.cpu()[b_idx, p_idx].numpy())
    tokens = pd.DataFrame({"id": columns["id"],
                           "position": np.concatenate(columns["position"]),
                           "token_id": np.concatenate(columns["token_id"])})
    meta = pd.DataFrame({"id": [s.id for s in seqs], "duplication": [s.duplication for s in seqs],
                         "member": [s.member for s in seqs]})
    tokens = tokens.merge(meta, on="id", how="left", validate="many_to_one")
    if token_labels is not None:
        tokens = tokens.merge(token_labels, on=["id", "position"], how="left",
                              validate="one_to_one")
    tokens.insert(3, "label", tokens.pop("label").fillna("unlabeled")
                  if "label" in tokens else "unlabeled")
    checksums, shapes = {}, {}
    for s in sites:
        d = out / _site_dir(s)
        d.mkdir(exist_ok=True)
        arr = np.concatenate(buffers[s])
        shapes[s] = list(arr.shape[1:])
        checksums[f"{_site_dir(s)}/{name}.npy"] = _write_npy(d / f"{name}.npy", arr)
    (out / "tokens").mkdir(exist_ok=True)
    tok_path = out / "tokens" / f"{name}.parquet"
    tokens.to_parquet(tok_path.with_suffix(".tmp"), index=False)
    os.replace(tok_path.with_suffix(".tmp"), tok_path)
    checksums[f"tokens/{name}.parquet"] = _file_checksum(tok_path)
    return {"name": name, "rows": len(tokens), "tokens": f"tokens/{name}.parquet",
            "checksums": checksums, "shapes": shapes}
