"""Audit step: does a removal forget, or only hide? The removal (an edited model, a steering
setup or a neuron ablation) under quantization, relearning, perturbed prompts and
membership inference, beside the unedited model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core import jsonio
from memlens.core.config import INDEX, Config, nested, option
from memlens.core.errors import ConfigError, DataError
from memlens.core.model import ModelOptions
from memlens.core.storage import writing
from memlens.data.labels import read_sequences
from memlens.methods.audit import AuditConfig, AuditData, audit
from memlens.methods.localize import NeuronAblation
from memlens.methods.probes import Probe
from memlens.methods.steering import Steering

__all__ = ["KINDS", "AuditCommand", "main", "removal_kind"]

# The removals an audit reads from disk, by the marker file each artifact holds.
KINDS = {"memlens_edit.json": "edited model", "steering.json": "steering",
         "ablation.json": "neuron ablation"}


def removal_kind(path: Path) -> str:
    """Which removal the directory ``path`` holds (see :data:`KINDS`)."""
    kind = next((k for m, k in KINDS.items() if (path / m).is_file()), None)
    if kind is None:
        raise ConfigError(f"--edit {path} holds none of {sorted(KINDS)}; pass an edited model "
                          "directory, a steering directory or a neuron ablation")
    return kind


@dataclass(kw_only=True)
class AuditCommand(Config):
    """does a removal forget, or only hide? attack it and see

    Scores the forget set on the model with the removal (an edited model directory, a
    steering setup or a neuron ablation; none: the model as it is) and on the unedited
    model: exact and loose extraction right after it, after INT8 / INT4 weight quantization,
    after relearning steps on the retain set's members (never the forget set), under
    perturbed prompts; membership AUROC against the retain set's non-members; perplexity on
    them. Out: one JSON.
    """

    EXAMPLE: ClassVar[str] = ("memlens audit --model organisms/tiny --edit organisms/tiny-"
                              "edited --forget organisms/tiny --forget-duplication 100 "
                              "--retain organisms/tiny --out audit/tiny.json")

    model: ModelOptions = nested(ModelOptions)
    edit: Path | None = option(None, "an edited model directory (memlens kfac edit), a "
                               "steering directory (memlens steer --save) or a neuron "
                               "ablation (memlens localize)")
    forget: Path = option(help="JSONL or organism directory: the removed sequences")
    forget_duplication: int | None = option(None, "keep only forget sequences with this "
                                            "duplication (e.g. 100)", INDEX)
    retain: Path = option(help="JSONL or organism directory: its members (other than the "
                          "forget set) are the relearning data, its non-members the "
                          "held-out set")
    probe: Path | None = option(None, "a probe directory: report its score on the forget set")
    out: Path = option(help="a .json file to write")
    audit: AuditConfig = nested(AuditConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.out.suffix != ".json" or self.out.is_dir():
            raise ConfigError(f"--out {self.out}: name a .json file")


def main(cmd: AuditCommand) -> None:
    kind = removal_kind(cmd.edit) if cmd.edit is not None else None
    probe = Probe.load(cmd.probe) if cmd.probe else None
    handle = cmd.model.load()
    forget = read_sequences(cmd.forget, handle.tokenizer)
    if cmd.forget_duplication is not None:
        forget = [s for s in forget if s.duplication == cmd.forget_duplication]
    if not forget:
        raise DataError(f"{cmd.forget} holds no sequence with duplication "
                        f"{cmd.forget_duplication}; check --forget-duplication")
    removed = {tuple(s.token_ids) for s in forget}
    retain = [s for s in read_sequences(cmd.retain, handle.tokenizer)
              if tuple(s.token_ids) not in removed]
    nonmembers = [s for s in retain if s.duplication == 0]
    data = AuditData(forget, [s.token_ids for s in retain if s.duplication != 0], nonmembers,
                     [s.token_ids for s in nonmembers])
    audited, removal = handle, None
    if kind == "edited model":
        audited = cmd.model.load(cmd.edit)
    elif kind == "steering":
        steering = Steering.load(cmd.edit)
        removal = lambda: steering.apply(handle)  # noqa: E731
    elif kind == "neuron ablation":
        ablation = NeuronAblation.load(cmd.edit)
        removal = lambda: ablation.apply(handle)  # noqa: E731
    report = {"model": handle.name, "edit": str(cmd.edit) if cmd.edit else None, "kind": kind,
              "forget": {"n": len(forget), "source": str(cmd.forget),
                         "duplication": cmd.forget_duplication},
              "config": dataclasses.asdict(cmd.audit)}
    if cmd.edit is not None:
        print("auditing the unedited model ...", flush=True)
        report["unedited"] = audit(handle, None, data, cmd.audit, probe=probe)
    print(f"auditing {kind or 'the model'} ...", flush=True)
    report["audited"] = audit(audited, removal, data, cmd.audit, probe=probe)
    with writing(cmd.out):
        jsonio.write(cmd.out, report)
    for name in ("unedited", "audited"):
        if name in report:
            r = report[name]
            cells = [f"{k} {r[k]['exact']:.0%}" for k in ("after_edit", "int8", "int4")
                     if k in r]
            cells += [f"relearn {k} {v['exact']:.0%}" for k, v in r["relearn"].items()]
            print(f"{name:9} exact extraction: " + ", ".join(cells)
                  + f"; loss AUROC {r['mia_auroc']['loss']:.2f}")
    print(f"wrote {cmd.out}")
