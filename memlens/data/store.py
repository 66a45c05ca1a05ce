"""Capture activations at named sites, streamed to disk in checksummed shards.

Sites are TransformerLens hook names (``blocks.2.hook_resid_post``, globs such as
``blocks.*.mlp.hook_post``) or HF module paths; see :mod:`memlens.core.sites` for the three
backends that read them.

Example:
    >>> labels = Labels.load("labels/")                   # from memlens label
    >>> store = capture(handle, labels, CaptureConfig(sites=["blocks.*.hook_resid_post"]),
    ...                 "acts")
    >>> store.array("blocks.2.hook_resid_post")    # memory-mapped [rows, d]
    >>> store.tokens                                # id, position, token_id, label per row
"""

from __future__ import annotations

import difflib
import io
import json
import os
import random
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memlens.core import distributed, jsonio
from memlens.core.config import COUNT, INDEX, Config, option
from memlens.core.errors import ConfigError, DataError, MissingArtifactError
from memlens.core.identity import Identity
from memlens.core.model import ModelHandle
from memlens.core.progress import progress as progress_bar
from memlens.core.sequences import Sequence
from memlens.core.sites import BACKENDS, UnknownSiteError, resolve_sites, run_sites
from memlens.core.storage import exclusive, prepare_output, writing
from memlens.data.labels import Labels

__all__ = ["DTYPES", "FORMAT_VERSION", "ActivationStore", "CaptureConfig", "CorruptShardError",
           "capture"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMAT_VERSION = 1


@dataclass
class CaptureConfig(Config):
    """What to record, where in each sequence, and how.

    ``backend="auto"`` records hook names through the bridge and HF module paths
    through plain PyTorch hooks.

    ``positions``: ``all`` (every token), ``suffix`` (positions ``prefix`` to
    ``prefix + suffix - 1``, the labeled suffix) or ``sample:N`` (N positions per
    sequence, drawn with ``seed``). Tokens without a label are marked ``unlabeled``.
    """

    sites: list[str] = option(["blocks.*.hook_resid_post"], "hook names or globs "
                              "(blocks.*.hook_resid_post), or HF module paths (model.layers.2, "
                              "model.layers.2.mlp.down_proj:input)")
    positions: str = option("all", "all, suffix or sample:N")
    prefix: int = option(32, "where the suffix starts", COUNT)
    suffix: int = option(32, "suffix length", COUNT)
    dtype: str = option("float32", "the stored activations' dtype", choices=tuple(DTYPES))
    backend: str = option("auto", "auto (the bridge for hook names, torch hooks for module "
                          "paths), bridge, nnsight or torch", choices=BACKENDS)
    batch_size: int = option(32, "sequences per forward pass", COUNT)
    shard_sequences: int = option(512, "sequences per shard (torchrun: ranks take shards in "
                                  "turn)", COUNT)
    max_len: int | None = option(None, "cut sequences to this length", COUNT)
    seed: int = option(0, "seed of sample:N", INDEX)

    def __post_init__(self):
        if isinstance(self.sites, str):
            self.sites = [self.sites]
        super().__post_init__()
        if not self.sites:
            raise ConfigError("no sites given; name at least one, e.g. blocks.0.hook_resid_post")
        if not (self.positions in ("all", "suffix") or _sample_n(self.positions)):
            raise ConfigError(f"positions {self.positions!r}: use all, suffix or sample:N "
                             "(e.g. sample:8)")


def _sample_n(positions: str) -> int:
    if positions.startswith("sample:") and positions[7:].isdigit() and int(positions[7:]) > 0:
        return int(positions[7:])
    return 0


# --------------------------------------------------------------------------- store


def _select_positions(seq: Sequence, n_tokens: int, cfg: CaptureConfig) -> list[int]:
    if cfg.positions == "all":
        return list(range(n_tokens))
    if cfg.positions == "suffix":
        return list(range(min(cfg.prefix, n_tokens), min(cfg.prefix + cfg.suffix, n_tokens)))
    k = _sample_n(cfg.positions)
    rng = random.Random(f"{cfg.seed}:{seq.id}")
    return sorted(rng.sample(range(n_tokens), min(k, n_tokens)))


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


class CorruptShardError(DataError):
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
            raise MissingArtifactError(f"{path} is not an activation store (no manifest.json); "
                                       "make one with memlens capture")
        try:
            store = cls(path, json.loads((path / "manifest.json").read_text()))
        except ValueError as exc:
            raise DataError(f"{path / 'manifest.json'} is not valid JSON ({exc}); capture "
                            "again into a new directory") from None
        store.check_paths()
        if verify:
            bad = store.verify()
            if bad:
                raise CorruptShardError(f"{len(bad)} shard(s) of {path} fail their checksum "
                                        f"({bad[0]} ...); rerun the same capture command to "
                                        "redo them")
        return store

    @property
    def identity(self) -> Identity:
        """What the store was captured from (model, sequences, config, labels)."""
        return Identity.from_json(self.manifest.get("identity"), str(self.path))

    @property
    def sites(self) -> list[str]:
        return self.manifest["sites"]

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def check_paths(self) -> None:
        """Refuse a manifest that names files outside the store (``../``, absolute paths)."""
        root = self.path.resolve()
        for shard in self.manifest.get("shards", []):
            names = [shard["tokens"], *shard["checksums"],
                     *(f"{_site_dir(s)}/{shard['name']}.npy" for s in self.sites)]
            for rel in names:
                if Path(rel).is_absolute() or not (root / rel).resolve().is_relative_to(root):
                    raise DataError(f"{self.path / 'manifest.json'} names {rel!r}, outside the "
                                    "store; it was edited or forged: capture again")

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
        """All rows of a site, [rows, *shape]; a memory map when the store has one shard,
        else loaded whole: read a store larger than memory with :meth:`rows`."""
        parts = self.shards(site)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def tensor(self, site: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows of a site as a torch tensor (bfloat16 shards are reinterpreted)."""
        return self._decode(np.array(self.array(site)), dtype)

    def rows(self, site: str, rows: np.ndarray, dtype: torch.dtype | None = torch.float32
             ) -> torch.Tensor:
        """The given rows of a site (store row numbers, any order), read shard by shard:
        only those rows are ever in memory. [len(rows), *shape], in ``dtype`` (None: as
        stored, bfloat16 included)."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = self.shards(site)
        ends = np.cumsum([len(p) for p in parts])
        if len(rows) and (rows.min() < 0 or rows.max() >= ends[-1]):
            raise DataError(f"row {int(rows.max())} is outside the {int(ends[-1])} rows of "
                            f"{self.path}")
        out = np.empty((len(rows), *parts[0].shape[1:]), dtype=parts[0].dtype)
        shard_of = np.searchsorted(ends, rows, side="right")
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            local = rows[where] - (ends[k - 1] if k else 0)
            # Plain reads of the blocks that hold the rows, not the memory map: pages a map
            # touches stay resident, so reading a whole store that way fills memory.
            part = parts[k]
            row_bytes = part.dtype.itemsize * int(np.prod(part.shape[1:], dtype=np.int64))
            block = np.empty((max(1, min((8 << 20) // max(row_bytes, 1), len(part))),
                              *part.shape[1:]), dtype=part.dtype)
            with open(part.filename, "rb") as f:
                for b in np.unique(local // len(block)):
                    first, stop = b * len(block), min((b + 1) * len(block), len(part))
                    f.seek(part.offset + first * row_bytes)
                    f.readinto(memoryview(block[:stop - first]).cast("B"))
                    inside = (local >= first) & (local < stop)
                    out[where[inside]] = block[local[inside] - first]
        return self._decode(out, dtype)

    def _decode(self, arr: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.manifest["dtype"] == "bfloat16":  # stored as uint16 bits
            t = t.view(torch.bfloat16)
        return t if dtype is None else t.to(dtype)


def _write_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy (atomically) and return the checksum of the file's bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    arr = np.ascontiguousarray(arr)
    digest = _Checksum()
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in (header.getbuffer(), memoryview(arr.reshape(-1).view(np.uint8))):
                digest.update(chunk)
                f.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return digest.hexdigest()


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.detach().to("cpu", DTYPES[dtype])
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def capture(handle: ModelHandle, sequences: list[Sequence] | Labels, config: CaptureConfig,
            out: str | Path, token_labels: pd.DataFrame | None = None,
            progress: bool = True) -> ActivationStore:
    """Run ``sequences`` through the model and stream activations at the sites to ``out``.

    Given :class:`~memlens.data.labels.Labels` (``Labels.load(dir)``), the labeled sequences are
    captured (up to the labeled prefix + suffix, unless ``max_len`` says otherwise) with each
    token's memorization label, after checking that the labels were made with this model;
    the store records which labels it was captured from. A plain list of
    sequences can come with ``token_labels`` (a labels ``tokens`` table).

    Rerunning the same call resumes: finished shards (checked by checksum) are kept,
    missing or corrupt ones are redone.
    """
    out = prepare_output(out, "store", marker="manifest.json")
    inputs = {}
    if isinstance(sequences, Labels):
        sequences.check_model(handle)
        inputs["labels"] = sequences.identity
        token_labels = sequences.tokens
        if config.max_len is None:  # tokens past the labeled window have no label
            config = replace(config, max_len=sequences.config.prefix + sequences.config.suffix)
        sequences = sequences.to_sequences()
    sites = resolve_sites(handle, config.sites)
    identity = Identity.make("store", handle, sequences, {**asdict(config), "sites": sites},
                             inputs)
    distributed.barrier()  # every rank has checked ``out`` before rank 0 writes to it
    with distributed.only_main(exclusive(out, "capture")), writing(out):
        return _capture(handle, sequences, config, out, token_labels, progress, identity, sites)


def _capture(handle, sequences, config, out, token_labels, progress, identity, sites
             ) -> ActivationStore:
    # Under torchrun, rank r captures the shards c with c % world_size == r and lists them
    # in its own rank file; rank 0 merges those into the manifest at the end (and, after a
    # killed run, at the start).
    with distributed.main_first():
        manifest = (_open_manifest(out, identity, sites, config) if distributed.is_main()
                    else json.loads((out / "manifest.json").read_text()))
    if token_labels is not None:
        token_labels = token_labels[["id", "position", "label"]].astype(
            {"id": str, "position": "int64"})
    size, rank = distributed.world_size(), distributed.rank()
    chunks = [(c, start) for c, start in enumerate(range(0, len(sequences),
                                                          config.shard_sequences))
              if c % size == rank]
    done = {s["name"] for s in manifest["shards"]}
    mine = {"shapes": {}, "shards": []}
    todo = [(c, start) for c, start in chunks if f"shard_{c:05d}" not in done]
    with progress_bar(total=len(chunks), initial=len(chunks) - len(todo),
                      disable=not progress, desc="capture", unit="shard") as bar:
        for c, start in todo:
            name = f"shard_{c:05d}"
            shard = _capture_shard(handle, sequences[start:start + config.shard_sequences],
                                   sites, config, out, name, token_labels)
            if size == 1:
                _add_shards(manifest, {"shapes": shard.pop("shapes"), "shards": [shard]})
                _write_manifest(out, manifest)
            else:
                _add_shards(mine, {"shapes": shard.pop("shapes"), "shards": [shard]})
                _write_manifest(out, mine, _rank_file(rank))
            bar.update()
    distributed.barrier()  # every rank's shards are written
    if distributed.is_main():
        _merge_rank_files(out, manifest)
        manifest["complete"] = True
        _write_manifest(out, manifest)
    distributed.barrier()
    if not distributed.is_main():
        manifest = json.loads((out / "manifest.json").read_text())
    return ActivationStore(out, manifest)


def _rank_file(rank: int) -> str:
    return f".manifest.rank{rank:03d}.json"


def _add_shards(manifest: dict, part: dict) -> None:
    names = {s["name"] for s in manifest["shards"]}
    manifest["shapes"].update(part["shapes"])
    manifest["shards"] += [s for s in part["shards"] if s["name"] not in names]
    manifest["shards"].sort(key=lambda s: s["name"])


def _merge_rank_files(out: Path, manifest: dict) -> None:
    """Move the shards the ranks list in their rank files into the manifest (atomically),
    then delete the rank files."""
    files = sorted(out.glob(".manifest.rank*.json"))
    for f in files:
        _add_shards(manifest, json.loads(f.read_text()))
    if files:
        _write_manifest(out, manifest)
    for f in files:
        f.unlink()


def _open_manifest(out: Path, identity: Identity, sites: list[str], config: CaptureConfig
                   ) -> dict:
    path = out / "manifest.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        changed = Identity.from_json(manifest.get("identity"), str(out)).differences(identity)
        if changed:
            raise ConfigError(f"{out} holds a capture with other {', '.join(changed)}; choose "
                              "a new --out or delete it")
        _merge_rank_files(out, manifest)  # shards ranks of a killed torchrun run finished
        store = ActivationStore(out, manifest)
        bad = {rel.split("/")[-1].removesuffix(".npy").removesuffix(".parquet")
               for rel in store.verify()}
        manifest["shards"] = [s for s in manifest["shards"] if s["name"] not in bad]
        manifest["complete"] = False
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": FORMAT_VERSION, "identity": identity.to_json(),
                "sites": sites, "dtype": config.dtype, "shapes": {}, "shards": [],
                "complete": False}
    _write_manifest(out, manifest)  # first: a rerun after any failure knows the directory
    return manifest


def _write_manifest(out: Path, manifest: dict, name: str = "manifest.json") -> None:
    tmp = out / f".{name}.tmp"
    try:
        tmp.write_text(jsonio.dumps(manifest, indent=1))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out / name)


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
    try:
        tokens.to_parquet(tok_path.with_suffix(".tmp"), index=False)
    except BaseException:
        tok_path.with_suffix(".tmp").unlink(missing_ok=True)
        raise
    os.replace(tok_path.with_suffix(".tmp"), tok_path)
    checksums[f"tokens/{name}.parquet"] = _file_checksum(tok_path)
    return {"name": name, "rows": len(tokens), "tokens": f"tokens/{name}.parquet",
            "checksums": checksums, "shapes": shapes}
