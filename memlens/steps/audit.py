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
from memlens.core.metrics import perplexity_change_ci, privleak, privleak_ci
from memlens.core.model import ModelOptions, load_model
from memlens.core.storage import writing
from memlens.data.labels import read_sequences
from memlens.data.organism import organism_path
from memlens.methods.audit import AuditConfig, AuditData, audit
from memlens.methods.localize import NeuronAblation
from memlens.methods.probes import Probe
from memlens.methods.steering import Steering
from memlens.report.figures import audit_heatmap
from memlens.report.page import Section
from memlens.steps import kfac, layernorm, localize, steer, unlearn
from memlens.steps.chain import Chain, skip

__all__ = ["AFTER", "ATTACKS", "KINDS", "LOADERS", "MODULES", "NAME", "REMOVALS", "TEXT", "TITLE",
           "AuditCommand", "audit_table", "best_removals", "forget_set", "main",
           "markdown_audit_table", "needs", "reference", "relearn_blocks", "removal_kind", "report"]

# The removals an audit reads from disk, by the marker file each artifact holds.
KINDS = {"memlens_edit.json": "edited model", "steering.json": "steering",
         "ablation.json": "neuron ablation"}


# How a removal saved as a directory is read back (an edited model is loaded as a model).
LOADERS = {"steering": Steering.load, "neuron ablation": NeuronAblation.load}


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
    elif kind is not None:
        removal = LOADERS[kind](cmd.edit)
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


# --------------------------------------------------------------------------- in the chain

NAME = "audit"
TITLE = "8. Forgetting audit: forgotten or hidden?"
TEXT = ("Does each removal chosen above forget the evaluation half's forget set, or only "
        "hide it? Each is attacked: weights quantized to INT8 and INT4, a few fine-tuning "
        "steps on other records (never the forget set), perturbed prompts, and membership "
        "inference against held-out non-members. The gold standard is a model never trained "
        "on the forget set (--reference, or the organism trained again without it). The "
        "table reads each row in the unlearning literature's terms as well: VerbMem (MUSE's "
        "ROUGE-L F1 of the greedy continuation against the true suffix) and PrivLeak "
        "(MUSE's relative gap, in percent, between a membership attack's AUC on the model "
        "and on the retrained one: 0 is ideal, near -100 is not unlearning at all).")
AFTER = ("labels", "probes", "kfac", "interventions", "steering", "layernorm", "unlearn")
# The membership attacks PrivLeak is read with (MUSE's own is Min-K%).
ATTACKS = {"loss": "loss", "min_k": "Min-K%", "min_k_pp": "Min-K%++", "zlib": "zlib"}
SETTINGS = ("audit_relearn_steps", "audit_relearn_blocks", "retrain")
REMOVALS = {"kfac": "K-FAC edit", "interventions": "neuron ablation",
            "steering": "steering", "layernorm": "norm removal"}
MODULES = {"kfac": kfac, "interventions": localize, "steering": steer, "layernorm": layernorm}


def forget_set(d: Chain) -> list:
    """The evaluation half's most repeated members where counts are known (an organism's
    100x canaries), else its recited members."""
    s = d.splits
    if d.counts:
        top = max(q.duplication or 0 for q in s.evaluation)
        return [q for q in s.evaluation if q.duplication == top]
    return d.recited("evaluation")


def needs(d: Chain) -> str | None:
    if not any(_chosen(d, step) for step in REMOVALS) and not _baselines(d):
        return "no removal was chosen above, so there is nothing to audit"
    return None


def _baselines(d: Chain) -> dict:
    """The unlearning baselines chosen above (by name), where the step ran."""
    path = d.out / "steps" / f"{unlearn.NAME}.json"
    if not path.is_file() or d.step_result(unlearn.NAME).get("skipped"):
        return {}
    return unlearn.removals(d)


def _chosen(d: Chain, step: str) -> bool:
    path = d.out / "steps" / f"{step}.json"
    if not path.is_file():
        return False
    result = d.step_result(step)
    return not result.get("skipped") and result["chosen"]["params"] is not None


def reference(d: Chain, forget: list):
    """The model never trained on ``forget``: --reference, or the organism trained again
    without it; None (and why) where there is neither."""
    if d.reference is not None:
        return d.options.load(d.reference), None
    org = d.organism
    if org is None or not d.splits.organism:  # ids name organism records only in its corpus
        return None, "pass --reference M0, a model never trained on the forget set"
    if not d.config.retrain:
        return None, "--retrain is off; pass --reference M0 or turn it on"
    return load_model(organism_path(org["preset"], org["arch"], org["seed"],
                                    withheld=tuple(int(q.id) for q in forget),
                                    progress=d.progress)), None


def relearn_blocks(d: Chain) -> tuple[int, ...] | None:
    """The blocks the relearning attacker trains: as set, else those an organism continued
    from a pretrained model trained (its memory can live only there), else every weight."""
    if d.config.audit_relearn_blocks is not None:
        return d.config.audit_relearn_blocks
    return d.trained_blocks


def report(d: Chain, sec: Section) -> dict:
    s = d.splits
    forget = forget_set(d)
    forgotten = {q.id for q in forget}
    relearn = list({q.id: q.token_ids for q in s.canaries + s.general[:500]
                    if q.id not in forgotten and q.member}.values())
    data = AuditData(forget, relearn, s.evaluation_nonmembers, d.clean_ids("evaluation"))
    config = AuditConfig(relearn_steps=d.config.audit_relearn_steps,
                         relearn_blocks=relearn_blocks(d))
    probes = d.step_result("probes")
    probe = None if probes.get("skipped") else Probe.load(d.probe_path(probes["best_probe"]))
    models = {"unedited": (d.handle, None)}
    skipped = []
    without, why = reference(d, forget)
    if without is not None:
        models["retrain without"] = (without, None)
    else:
        skipped.append(skip(sec, "The retrain-without comparison", why))
    for step, name in REMOVALS.items():
        if _chosen(d, step):
            models[name] = (d.handle, MODULES[step].removal(d))
    told = set(_baselines(d))
    models |= {name: (d.handle, edit) for name, edit in _baselines(d).items()}
    refits = {}
    if "steering" in models:
        # Steering's gate is refitted on the relearned model: hidden memory, or a stale gate?
        fit_on = s.calibration + s.calibration_nonmembers
        steering = models["steering"][1]
        if steering.gate is not None:
            refits["steering"] = lambda: steering.refit(d.handle, fit_on, d.labels.tokens)
    if not s.evaluation_nonmembers:
        skipped.append(skip(sec, "Membership inference in the audit", "add held-out records "
                            "the model was never trained on, marked 'duplication': 0"))
    results = [{"name": name, **audit(model, removal, data, config, d.cfg, probe=probe,
                                      refit=refits.get(name), progress=d.progress)}
               for name, (model, removal) in models.items()]
    sec.figure(audit_heatmap(results))
    last = str(max(config.relearn_steps))
    gold = next((r for r in results if r["name"] == "retrain without"), None)
    removals = [r for r in results if r["name"] not in ("unedited", "retrain without")]
    if gold is not None and removals:
        def gap(r):  # the largest distance from the retrain-without model
            gaps = [abs(r["int4"]["exact"] - gold["int4"]["exact"]),
                    abs(r["relearn"][last]["exact"] - gold["relearn"][last]["exact"])]
            if r["mia_auroc"] is not None:
                gaps.append(abs(r["mia_auroc"]["loss"] - gold["mia_auroc"]["loss"]))
            return max(gaps)

        closest = min(removals, key=gap)
        sec.finding(f"Closest to the model that never saw the forget set: {closest['name']} "
                    f"(largest gap {gap(closest):.2f}: after INT4 "
                    f"{closest['int4']['exact']:.0%}, after {last} relearning steps "
                    f"{closest['relearn'][last]['exact']:.0%}); a removal that forgets "
                    "matches that row under every attack.")
    for r in removals:
        if "relearn_refit" in r:
            sec.finding(f"After {last} relearning steps steering leaves "
                        f"{r['relearn'][last]['exact']:.0%} of the forget set recited with its "
                        f"stale gate and {r['relearn_refit'][last]['exact']:.0%} with a gate "
                        f"refitted on the relearned model (the unedited model after the same "
                        f"steps: {results[0]['relearn'][last]['exact']:.0%}).")
    rows = {r["name"]: _row(r, results[0], gold, r["name"] in told) for r in results}
    table = audit_table(rows, last)
    sec.table(table)
    best = best_removals(rows, last)
    if best:
        sec.finding("Best removal per column (extraction and VerbMem lowest, PrivLeak nearest "
                    "0, perplexity change smallest): " + "; ".join(
                        f"{col}: {', '.join(names)}" for col, names in best.items()) + ".")
    if gold is not None:
        leak = {n: r["privleak"]["min_k"]["value"] for n, r in rows.items()
                if n not in ("unedited", "retrain without") and r["privleak"]}
        near = [n for n, v in leak.items() if v is not None and v < -80]
        if near:
            sec.finding(f"Read as MUSE reads it (PrivLeak by Min-K%), {', '.join(near)} "
                        f"{'leaves' if len(near) == 1 else 'leave'} the forget set as exposed "
                        "to membership inference as not unlearning at all: PrivLeak below -80 "
                        f"(the unedited model: "
                        f"{rows['unedited']['privleak']['min_k']['value']:.0f}).")
    return {"forget": {"n": len(forget), "ids": sorted(forgotten)}, "skipped_parts": skipped,
            "relearn_blocks": config.relearn_blocks, "best": best, **rows}


def _row(r: dict, base: dict, gold: dict | None, told: bool) -> dict:
    """One audit row's headline figures, with 95% intervals over records."""
    mia = r["mia_auroc"] or {}
    change = r["after_edit"]["perplexity"] / base["after_edit"]["perplexity"] - 1
    return {"exact": r["after_edit"]["exact"], "int4": r["int4"]["exact"],
            "int8": r["int8"]["exact"], "perturbed": r["perturbed"],
            "relearn": {k: v["exact"] for k, v in r["relearn"].items()},
            **({"relearn_refit": {k: v["exact"] for k, v in r["relearn_refit"].items()}}
               if "relearn_refit" in r else {}),
            "verbmem": r["after_edit"]["verbmem"],
            "mia_auroc_loss": mia.get("loss"),
            "mia_auroc": {k: v for k, v in mia.items() if k not in ("ci", "scores")} or None,
            "privleak": _privleak(r, gold),
            "perplexity": r["after_edit"]["perplexity"],
            "perplexity_change": change,
            "told_forget_set": told,
            "ci": _intervals(r) | {"verbmem": r["after_edit"]["verbmem_ci"],
                                   "perplexity_change": list(perplexity_change_ci(
                                       r["after_edit"]["heldout_losses"],
                                       base["after_edit"]["heldout_losses"]))}}


def _privleak(r: dict, gold: dict | None) -> dict | None:
    """PrivLeak per attack against the retrained model, with a paired interval; None
    without a retrained model or non-members."""
    if gold is None or not r["mia_auroc"] or not gold["mia_auroc"]:
        return None
    out = {}
    for attack in (*ATTACKS, "neighbourhood"):
        mine, theirs = r["mia_auroc"]["scores"][attack], gold["mia_auroc"]["scores"][attack]
        ci = privleak_ci(mine["forget"], mine["nonmembers"], theirs["forget"],
                         theirs["nonmembers"])
        out[attack] = {"value": privleak(r["mia_auroc"][attack], gold["mia_auroc"][attack]),
                       "ci": None if ci is None else list(ci)}
    return out


def _columns(last: str) -> dict:
    """The audit table's columns: (how a row gives its value and interval, lower is
    better / nearest 0 is better)."""
    cols = {"exact after the removal": (lambda r: (r["exact"], r["ci"]["exact"]), "low"),
            "after INT4": (lambda r: (r["int4"], r["ci"]["int4"]), "low"),
            f"after {last} relearning steps": (
                lambda r: (r["relearn"][last], r["ci"]["relearn"][last]), "low"),
            "VerbMem": (lambda r: (r["verbmem"], r["ci"]["verbmem"]), "low")}
    for attack, name in ATTACKS.items():
        cols[f"PrivLeak ({name})"] = (
            lambda r, a=attack: ((r["privleak"][a]["value"], r["privleak"][a]["ci"])
                                 if r["privleak"] else (None, None)), "zero")
    cols["perplexity change"] = (lambda r: (r["perplexity_change"],
                                            r["ci"]["perplexity_change"]), "low")
    return cols


def _cell(col: str, value, ci) -> str:
    if value is None:
        return "n/a"
    if col.startswith("PrivLeak"):
        return f"{value:+.0f} [{ci[0]:+.0f}, {ci[1]:+.0f}]" if ci else f"{value:+.0f}"
    if col == "VerbMem":
        return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    if col == "perplexity change":
        return f"{value:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}]"
    return f"{value:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]"


def best_removals(rows: dict, last: str) -> dict[str, list[str]]:
    """Per column, the removals (not a reference row) with the best value (all of them
    where several tie; none where every removal ties)."""
    removals = {n: r for n, r in rows.items() if n not in ("unedited", "retrain without")}
    best = {}
    for col, (get, rule) in _columns(last).items():
        vals = {n: get(r)[0] for n, r in removals.items() if get(r)[0] is not None}
        key = {n: abs(v) if rule == "zero" else v for n, v in vals.items()}
        tied = [n for n, k in key.items() if k == min(key.values())]
        if key and len(tied) < len(removals):  # where every removal ties, none is best
            best[col] = tied
    return best


def audit_table(rows: dict, last: str) -> list[dict]:
    """The audit table: one row per model (the unedited model, each removal, the model
    retrained without the forget set), the value and 95% interval per column."""
    order = ["unedited", *[n for n in rows if n not in ("unedited", "retrain without")],
             "retrain without"]
    out = []
    for name in (n for n in order if n in rows):
        r = rows[name]
        row = {"removal": name, "told the forget set": (
            "reference" if name in ("unedited", "retrain without") else
            "yes" if r.get("told_forget_set") else "no")}
        for col, (get, _) in _columns(last).items():
            row[col] = _cell(col, *get(r))
        out.append(row)
    return out


def markdown_audit_table(audit_summary: dict) -> str:
    """A run's audit table (its summary's ``audit``) in Markdown, each column's best
    removals in bold."""
    rows = {k: v for k, v in audit_summary.items() if isinstance(v, dict) and "exact" in v}
    last = str(max(int(k) for k in rows["unedited"]["relearn"]))
    table = audit_table(rows, last)
    best = best_removals(rows, last)
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        lines.append("| " + " | ".join(f"**{v}**" if row["removal"] in best.get(c, ()) else v
                                       for c, v in row.items()) + " |")
    return "\n".join(lines)


def _intervals(r: dict) -> dict:
    """95% intervals over the forget records (and the non-members, for membership) of an
    audit row's figures."""
    mia = r["mia_auroc"] or {}
    return {"exact": r["after_edit"]["exact_ci"], "int4": r["int4"]["exact_ci"],
            "relearn": {k: v["exact_ci"] for k, v in r["relearn"].items()},
            "mia_auroc": mia.get("ci")}
