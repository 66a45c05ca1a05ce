"""Artifact identity: what an artifact was made from, written with it and checked on load.

Every artifact memlens writes (labels, activation stores, probes, K-FAC factors, edited
models, neuron ablations, steering setups, demo step caches) carries one header:

    {"kind": "labels", "memlens_version": "0.2.0", "model": "organisms/tiny",
     "model_hash": "9c1e...", "corpus_hash": "51d0...", "config": {...},
     "inputs": {"labels": "<digest of the labels header it was made from>"}}

``model_hash`` hashes every parameter tensor; ``corpus_hash`` hashes the sequences (id,
duplication, token ids). A step that reads an artifact checks the header against the model
and data it is given and refuses, naming the artifact and what changed.

Example:
    >>> ident = Identity.make("labels", handle, seqs, asdict(cfg))
    >>> ident.check_model(handle, "labels/")       # raises ArtifactMismatch if weights differ
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from memlens.core import jsonio
from memlens.core.errors import ArtifactMismatch, DataError, MissingArtifactError
from memlens.core.version import VERSION

__all__ = ["Identity", "corpus_hash", "digest", "file_digest", "read_artifact", "state_hash",
           "weights_hash", "write_artifact"]


def digest(obj, n: int = 16) -> str:
    """A short SHA-256 of a JSON-able object (canonical: sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def weights_hash(model: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer of the model, by name."""
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):  # parts offloaded by a device_map
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        state = get_state_dict_offloaded_model(model)
    return state_hash(state)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """A short hash of named tensors (a state dict)."""
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def corpus_hash(seqs) -> str:
    """A short hash of sequences: each one's id, duplication and token ids, in order (plain
    token-id lists count as id = index, unknown duplication)."""
    h = hashlib.sha256()
    for i, s in enumerate(seqs):
        ident, dup, ids = ((i, None, s) if isinstance(s, (list, tuple))
                           else (s.id, s.duplication, s.token_ids))
        h.update(f"{ident}:{dup}:{','.join(map(str, ids))};".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """The header of one artifact (see the module docstring)."""

    kind: str
    model_hash: str
    corpus_hash: str | None = None
    config: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    model: str = ""
    memlens_version: str = ""

    @classmethod
    def make(cls, kind: str, handle, seqs=None, config: dict | None = None,
             inputs: dict[str, Identity] | None = None, corpus: str | None = None
             ) -> Identity:
        """The header for an artifact of ``kind`` made with ``handle`` from ``seqs`` (or a
        known ``corpus`` hash) under ``config``; ``inputs`` are the artifacts it read."""
        return cls(kind, handle.weights_hash(),
                   corpus if seqs is None else corpus_hash(seqs),
                   json.loads(json.dumps(config or {}, default=str)),
                   {k: v.digest for k, v in (inputs or {}).items()}, handle.name, VERSION)

    def with_changes(self, **changes) -> Identity:
        """This header with some fields replaced (``kind``, ``config``, ``inputs``...), as
        the header of an artifact made from this one."""
        if "config" in changes:
            changes["config"] = json.loads(json.dumps(changes["config"], default=str))
        return replace(self, **changes)

    @property
    def digest(self) -> str:
        """Hash of the whole header: names this artifact in the headers made from it."""
        return digest(self.to_json())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj, where: str) -> Identity:
        """Read a header; ``where`` names the artifact in errors."""
        if not isinstance(obj, dict) or "kind" not in obj or "model_hash" not in obj:
            raise DataError(f"{where} carries no memlens identity header; it was not written "
                            "by this memlens (or was edited): make it again")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in obj.items() if k in known})

    def differences(self, other: Identity) -> list[str]:
        """What differs between two headers, in words (the version is not compared)."""
        names = {"kind": "kind", "model_hash": "model weights", "corpus_hash": "sequences",
                 "config": "settings", "inputs": "input artifacts"}
        return [words for f, words in names.items() if getattr(self, f) != getattr(other, f)]

    def expect_kind(self, kind: str, where: str) -> Identity:
        if self.kind != kind:
            raise ArtifactMismatch(f"{where} is a {self.kind} artifact, not {kind}; pass the "
                                   f"{kind} directory")
        return self

    def check_model(self, handle, where: str) -> None:
        """Refuse when ``handle``'s weights are not those this artifact was made with."""
        now = handle.weights_hash()
        if now != self.model_hash:
            raise ArtifactMismatch(
                f"{where} was made with model weights {self.model_hash} ({self.model}), but "
                f"{handle.name} has weights {now}: the model changed. Remake {where} with "
                "this model, or pass the model it was made with.")

    def check_corpus(self, other: Identity, where: str, other_where: str) -> None:
        """Refuse when two artifacts describe different sequences or models."""
        if other.model_hash != self.model_hash:
            raise ArtifactMismatch(
                f"{where} was made with model weights {self.model_hash} ({self.model}) but "
                f"{other_where} with {other.model_hash} ({other.model}): the model changed "
                "between them. Remake the later one from the earlier.")
        if other.corpus_hash != self.corpus_hash:
            raise ArtifactMismatch(
                f"{where} holds sequences {self.corpus_hash} but {other_where} holds "
                f"{other.corpus_hash}: the corpus changed between them. Capture from the "
                "labels directory you train on (memlens capture --labels DIR).")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_artifact(path: Path, name: str, kind: str, make: str) -> tuple[dict, Identity]:
    """The JSON file ``path/name`` of an artifact of ``kind`` and its identity header.

    Missing: an error naming ``path`` and saying how to ``make`` one; a header of another
    kind, or none: an error naming the file.
    """
    where = Path(path) / name
    if not where.is_file():
        raise MissingArtifactError(f"{path} holds no {kind} ({name}); make one with {make}")
    try:
        meta = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where} is not valid JSON ({exc}); remake the {kind}") from None
    if not isinstance(meta, dict) or meta.pop("checksum", None) != digest(meta, 64):
        raise DataError(f"{where} does not match its checksum (edited or corrupted); make the "
                        f"{kind} again")
    identity = Identity.from_json(meta.get("identity"), str(path))
    identity.expect_kind(kind, str(path))
    for rel, want in meta.get("files", {}).items():
        f = Path(path) / rel
        if not f.is_file():
            raise DataError(f"{f} is missing; the {kind} is incomplete: make it again")
        if file_digest(f) != want:
            raise DataError(f"{f} does not match its checksum (truncated or corrupted); make "
                            f"the {kind} again")
    return meta, identity


def write_artifact(path: Path, name: str, meta: dict, identity: Identity | dict,
                   files: tuple[str, ...] = ()) -> Path:
    """Write ``meta`` with its identity header as the JSON file ``path/name``, atomically
    (a crash leaves the old file or the new one, never half of one). ``files`` (names in
    ``path``, written before) get a checksum that :func:`read_artifact` verifies."""
    header = identity.to_json() if isinstance(identity, Identity) else identity
    if files:
        meta = {**meta, "files": {f: file_digest(Path(path) / f) for f in files}}
    payload = jsonio.plain({**meta, "identity": header})
    payload["checksum"] = digest(payload, 64)
    return jsonio.write(Path(path) / name, payload)
