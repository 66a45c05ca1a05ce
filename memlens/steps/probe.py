"""Probe step: labels and a store -> a probe per site, the sweep's results and figure;
or the whole label -> capture -> probe run from one TOML config."""

from __future__ import annotations

import fnmatch
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from memlens.core.config import INDEX, Config, from_mapping, nested, option
from memlens.core.errors import ConfigError
from memlens.core.identity import read_artifact, write_artifact
from memlens.core.model import ModelHandle, ModelOptions, load_model
from memlens.core.sequences import Sequence
from memlens.core.sites import run_sites
from memlens.core.storage import exclusive, prepare_output
from memlens.data.labels import (
    LabelConfig,
    Labels,
)
from memlens.data.organism import organism_path
from memlens.data.store import ActivationStore, CaptureConfig
from memlens.methods.probes import CONFIDENCE, Probe, ProbeConfig, ProbeData, probe_sweep
from memlens.methods.probes.lens import LENS, lens_features, residual_sites
from memlens.report.figures import layer_sweep_figure
from memlens.report.page import Section, labeled_sequence, token_view
from memlens.steps.capture import capture_step
from memlens.steps.chain import Chain
from memlens.steps.label import label_step

__all__ = ["AFTER", "CONFIGS", "NAME", "SETTINGS", "TEXT", "TITLE", "ModelSource", "ProbeCommand",
           "ProbeRun", "expand_sites", "load_config", "main", "needs", "report", "run_config",
           "train_probes"]


def expand_sites(patterns: list[str], names: list[str]) -> list[str]:
    """Site globs (``blocks.*.hook_resid_post``, ``confidence``) expanded over ``names``."""
    out = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"combo entry {pat!r} matches no captured site; captured: {names}")
        out += [h for h in hits if h not in out]
    return out


def train_probes(labels: Labels | str | Path, store: ActivationStore | str | Path,
                 out: str | Path, config: ProbeConfig | None = None,
                 combos: dict[str, list[str]] | None = None, trainers=("torch",),
                 split: dict[str, str] | None = None, progress: bool = True,
                 keep: tuple[str, ...] = (), handle: ModelHandle | None = None) -> dict:
    """Fit a probe per captured site (and per combo) from a labels dir and the store captured
    from it; write results.json, results.parquet, layer_sweep.html and every single-site
    probe, plus the best combined one, to ``out/probes/NAME``. Returns the summary. ``out``
    may already hold the labels and store directories and the files named in ``keep``.

    With the model's ``handle`` (and residual streams captured), the logit lens of every
    residual site is a pseudo-site too (``lens``, :mod:`memlens.methods.probes.lens`),
    probed alone, with the model's confidence, and with the confidence and each site."""
    t0 = time.perf_counter()
    labels = labels if isinstance(labels, Labels) else Labels.load(labels)
    store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    out = prepare_output(out, "probes", marker="results.json",
                         allowed=("labels", "store", "probes", *keep))
    data = ProbeData.from_store(store, labels, config or ProbeConfig(), split=split)
    resid = residual_sites(store.sites)
    if handle is not None and resid and data.config.align == "predicting":
        data = data.with_features(LENS, lens_features(handle, data, progress=progress))
        combos = {**(combos or {}), f"{LENS}+{CONFIDENCE}": [LENS, CONFIDENCE],
                  **{f"{LENS}+{CONFIDENCE}+{site}": [LENS, CONFIDENCE, site]
                     for site in resid}}
    with exclusive(out, "train probes"):
        return _train_probes(labels, store, out, data, combos, trainers, progress, t0)


def _train_probes(labels, store, out, data, combos, trainers, progress, t0) -> dict:
    names = list(data.features)
    combos = {k: expand_sites(v, names) for k, v in (combos or {}).items()}
    sweep = probe_sweep(data, labels.sequences, combos=combos, trainers=trainers,
                        progress=progress)
    res = sweep.results[(sweep.results["trainer"] == trainers[0]) & ~sweep.results["control"]]
    # Sites are chosen on validation tokens and reported on test tokens: picking the best of
    # many sites by test AUROC would overstate the chosen one.
    selected_on = "val" if res["val_auroc"].notna().all() else "test"
    if selected_on == "test":
        print("memlens: warning: the validation split holds one class only, so the best "
              "probe is chosen on test tokens (optimistic); label more sequences",
              file=sys.stderr)
    key = {"val": "val_auroc", "test": "auroc"}[selected_on]
    best = res.loc[res[key].idxmax()]
    single = res[res["probe"].isin(store.sites)]
    best_single = single.loc[single[key].idxmax()]
    seq = sweep.baselines.get("sequence_memorized", {})
    summary = {
        "model": labels.identity.model, "labels": str(labels.path), "store": str(store.path),
        "n_tokens": int(len(data.tokens)), "n_positive": int(data.tokens["y"].sum()),
        "n_test_tokens": int(data.mask("test").sum()),
        "selected_on": selected_on,
        "best_site": best["probe"], "best_token_auroc": float(best["auroc"]),
        "best_token_auroc_ci": [float(best["auroc_ci_low"]), float(best["auroc_ci_high"])],
        "best_tpr_at_1pct_fpr": float(best["tpr_at_1pct_fpr"]),
        "selectivity": float(best["selectivity"]),
        "best_matched_auroc": float(best["matched_auroc"]),
        "best_matched_coverage": float(best["matched_coverage"]),
        "best_pii_auroc": float(best["pii_auroc"]),
        "best_gain_over_confidence": [float(best[k]) for k in (
            "gain_over_confidence", "gain_ci_low", "gain_ci_high")],
        "best_single_site": best_single["probe"],
        "best_single_site_auroc": float(best_single["auroc"]),
        "best_single_site_selectivity": float(best_single["selectivity"]),
        "best_sequence_auroc": seq.get("probes", {}).get(best["probe"], float("nan")),
        "baseline_sequence_auroc": max(seq.get("baselines", {"none": float("nan")}).values()),
        "token_baselines": {k: v for k, v in sweep.baselines.items() if k.startswith("token_")},
        "sequence_level": {k: v for k, v in sweep.baselines.items()
                           if k.startswith("sequence_")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    sweep.results.to_parquet(out / "results.parquet", index=False)
    identity = data.identity.with_changes(kind="probes", inputs=data.inputs,
                                          config=asdict(data.config))
    write_artifact(out, "results.json", summary, identity)
    layer_sweep_figure(sweep.results, sweep.baselines, trainers[0]).write_html(
        out / "layer_sweep.html", include_plotlyjs=True)
    keep = set(single["probe"]) | {best["probe"]}
    for name in keep:
        sweep.probes[name].save(out / "probes" / name.replace("+", "__"))
    return summary


CONFIGS = Path(__file__).parent.parent / "configs"


@dataclass(kw_only=True)
class ModelSource(Config):
    """The [model] table of a probe run: an organism preset, or a model directory."""

    organism: str = option("small", "a preset of the embedded organism")
    arch: str = option("llama", "the organism's architecture")
    seed: int = option(0, "the organism's seed", INDEX)
    path: Path | None = option(None, "a model directory instead of an organism")
    data: Path | None = option(None, "JSONL to label (default: the model's corpus.jsonl)")


@dataclass(kw_only=True)
class ProbeRun(Config):
    """A whole probe run in one file: label, capture and a probe sweep (a TOML file loads
    into this; see ``memlens/configs/organism.toml``)."""

    out: Path = option(Path("experiments/results/probes"), "output directory")
    roles: tuple[str, ...] = option(("canary", "nonmember"), "roles of the corpus to label")
    trainers: tuple[str, ...] = option(("torch",), "probe trainers (the first one's probes "
                                       "are saved)", choices=("torch", "sklearn"))
    combos: dict[str, list[str]] = option({}, "probes on several sites: name -> site globs "
                                          "(confidence: the model's max log-prob and entropy)")
    model: ModelSource = nested(ModelSource)
    labels: LabelConfig = nested(LabelConfig, factory=lambda: LabelConfig(generate=False))
    capture: CaptureConfig = nested(CaptureConfig)
    probe: ProbeConfig = nested(ProbeConfig)
    source: str = option("a config object", "where the settings came from", cli=False)


def load_config(config: str | Path | ProbeRun) -> ProbeRun:
    """A probe run's settings: a TOML file, the name of one that ships with memlens
    (``"organism"``: ``memlens/configs/organism.toml``), or the :class:`ProbeRun` itself.
    Unknown keys are refused, naming the key, its table and the nearest valid key.

    Example:
        >>> cfg = dataclasses.replace(load_config("organism"), out=Path("/tmp/probes"))
        >>> run_config(cfg)
    """
    import tomllib

    if isinstance(config, ProbeRun):
        return config
    path = Path(config)
    if not path.is_file() and (CONFIGS / f"{config}.toml").is_file():
        path = CONFIGS / f"{config}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIGS.glob("*.toml"))
        raise ConfigError(f"no config file {config}; give a TOML file or one of the configs "
                          f"memlens ships: {shipped}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if "source" in table:
        raise ConfigError(f"unknown key 'source' in {path.name}")
    return from_mapping(ProbeRun, table | {"source": str(path)}, path.name)


def run_config(config: str | Path | ProbeRun, progress: bool = True) -> dict:
    """Label, capture and train probes from one config (see :func:`load_config`); each
    step is reused when its artifact is already there for the same model and settings."""

    cfg = load_config(config)
    m = cfg.model
    model_dir = m.path or organism_path(m.organism, m.arch, m.seed)
    handle = load_model(model_dir)
    labels = label_step(handle, m.data or model_dir, cfg.out / "labels", cfg.labels,
                        roles=cfg.roles, progress=progress, reuse=True)
    store = capture_step(handle, labels, cfg.out / "store", cfg.capture, progress)
    keep = (Path(cfg.source).name,) if Path(cfg.source).suffix == ".toml" else ()
    summary = train_probes(labels, store, cfg.out, cfg.probe, cfg.combos, cfg.trainers,
                           progress=progress, keep=keep)
    summary["config"] = cfg.source
    meta, identity = read_artifact(cfg.out, "results.json", "probes", "memlens probe train")
    write_artifact(cfg.out, "results.json", {**meta, "config": cfg.source}, identity)
    return summary


@dataclass(kw_only=True)
class ProbeCommand(Config):
    """fit a probe per site from labels and a store

    Reads a labels directory and the store captured from it (refused if they describe other
    models or sequences) and writes OUT/results.json, results.parquet, layer_sweep.html and
    OUT/probes/SITE for every site. Without --store, captures --sites from the labels into
    OUT/store; without --labels, labels --data first into OUT/labels (both need --model).
    Or run a whole TOML config with --config.
    """

    EXAMPLE: ClassVar[str] = ("memlens probe train --labels labels/tiny --store acts/tiny "
                              "--out probes/tiny\n  memlens probe train --config organism")

    config: Path | None = option(None, "a TOML file, or a config memlens ships (organism); "
                                 "alone")
    labels: Path | None = option(None, "labels directory (memlens label)")
    store: Path | None = option(None, "store captured from those labels")
    out: Path | None = option(None, "output directory")
    model: ModelOptions = nested(ModelOptions, skip=("device",))
    data: Path | None = option(None, "JSONL or organism dir to label (no --labels)")
    sites: tuple[str, ...] = option(("blocks.*.hook_resid_post",), "sites to capture when "
                                    "no --store is given")
    probe: ProbeConfig = nested(ProbeConfig)

    def __post_init__(self):
        super().__post_init__()
        given = (self.labels, self.store, self.out, self.model.model, self.data)
        if self.config is not None and any(x is not None for x in given):
            raise ConfigError("--config runs a whole TOML file; give it alone")
        if self.config is None and self.out is None:
            raise ConfigError("probe train needs --out DIR (or --config FILE)")
        if self.config is None and self.labels is None and self.data is None:
            raise ConfigError("give --labels DIR (from memlens label), or --data to label")


def main(cmd: ProbeCommand) -> None:
    if cmd.config is not None:
        summary = run_config(cmd.config)
    else:
        needs_model = cmd.labels is None or cmd.store is None
        if needs_model and cmd.model.model is None:
            raise ConfigError("without --labels and --store, probe train labels or captures "
                              "itself and needs --model (and --data without --labels)")
        handle = cmd.model.load() if needs_model else None
        labels = (Labels.load(cmd.labels) if cmd.labels is not None
                  else label_step(handle, cmd.data, cmd.out / "labels"))
        store = cmd.store or capture_step(handle, labels, cmd.out / "store",
                                          CaptureConfig(sites=list(cmd.sites)))
        summary = train_probes(labels, store, cmd.out, cmd.probe)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))


# --------------------------------------------------------------------------- in the chain

NAME = "probes"
TITLE = "2. Activations and probes"
TEXT = ("A linear probe per residual-stream site classifies memorized tokens from the "
        "state that predicts them; control tasks (random labels per token type) give its "
        "selectivity. The model's own confidence already separates memorized tokens well (a "
        "recited token is predicted with high probability), so a probe on that confidence "
        "(max log-prob and entropy) is the baseline every probe is scored against: its gain "
        "with a 95% interval over records, the AUROC on PII tokens alone (memorized vs not "
        "recalled: a probe that only finds PII values scores nothing there), and the AUROC "
        "among tokens matched for confidence (propensity matching within a caliper, with the "
        "share of memorized tokens that found a match). The logit lens of every residual "
        "site (each layer read through the model's final norm and unembedding: where the "
        "prediction forms) is probed too, alone and with the confidence and each site; the "
        "best probe is chosen on the calibration half's validation records. Below, held-out "
        "texts token by token: switch between the memorization label and the best single-"
        "site probe's score; hover a token for details.")


def _token_rows(d: Chain, seqs: list[Sequence], probe, tokens) -> list[dict]:
    site = probe.sites[0]
    out = []
    for seq in seqs:
        ids = seq.token_ids[:d.cfg.prefix + d.cfg.suffix]
        x, mask = d.handle.pad([ids])
        with torch.no_grad():
            acts = run_sites(d.handle, [site], x, mask, backend="torch")[site][0].float()
        # The state that predicts token t sits at t - 1.
        scores = np.concatenate([[np.nan], probe.score(acts.cpu().numpy())[:-1]])
        kind = ("non-member" if seq.duplication == 0 else "record" if seq.duplication is None
                else f"{seq.duplication}x record")
        out.append(labeled_sequence(tokens, d.handle.tokenizer, seq.id, ids, scores,
                                    title=f"{kind} {seq.id}"))
    return out


AFTER = ("labels",)
SETTINGS = ("probe_sites",)


def needs(d: Chain) -> str | None:
    counts = d.labels.tokens.query("label == 'memorized'")["id"].astype(str)
    if not set(counts) & {s.id for s in d.splits.calibration}:
        return ("the model recites no record of the calibration half, so there are no "
                "memorized tokens to train a probe on; add records it recites")
    return None


def _row(r: pd.Series, seq: dict) -> dict:
    """A probe's evaluation-half figures, as the summary gives them."""
    return {"probe": r["probe"], "auroc": float(r["auroc"]),
            "auroc_ci": [float(r["auroc_ci_low"]), float(r["auroc_ci_high"])],
            "pii_auroc": float(r["pii_auroc"]), "matched_auroc": float(r["matched_auroc"]),
            "matched_coverage": float(r["matched_coverage"]),
            "gain_over_confidence": [float(r[k]) for k in (
                "gain_over_confidence", "gain_ci_low", "gain_ci_high")],
            "sequence_auroc": seq.get("probes", {}).get(r["probe"]),
            "validation_auroc": float(r["val_auroc"])}


def report(d: Chain, sec: Section) -> dict:
    labels = d.labels
    store = capture_step(d.handle, labels, d.store_dir,
                         CaptureConfig(sites=[d.config.probe_sites]), progress=d.progress)
    summary = train_probes(labels, store, d.probes_dir, split=d.splits.probe_split(),
                           progress=d.progress, handle=d.handle)
    results = pd.read_parquet(d.probes_dir / "results.parquet")
    res = results[~results["control"]].sort_values("auroc", ascending=False)
    by_name = res.set_index("probe", drop=False)
    # The best probe of all on validation tokens, and the best on one captured site (what
    # steering gates on and the audit scores with).
    top, best = by_name.loc[summary["best_site"]], by_name.loc[summary["best_single_site"]]
    probe = Probe.load(d.probe_path(best["probe"]))
    sec.figure(layer_sweep_figure(results, summary["token_baselines"]))
    sec.table(res[["probe", "auroc", "auroc_ci_low", "auroc_ci_high", "pii_auroc",
                   "matched_auroc", "matched_coverage", "gain_over_confidence", "gain_ci_low",
                   "gain_ci_high", "val_auroc", "control_auroc", "selectivity"]])
    seq = summary["sequence_level"].get("sequence_memorized", {})
    membership = max(seq.get("baselines", {}).items(), key=lambda kv: kv[1], default=None)
    confidence = by_name.loc[CONFIDENCE] if CONFIDENCE in by_name.index else None
    rows = {"best_overall": _row(top, seq), "best_single_site": _row(best, seq)}
    if confidence is not None:
        rows["confidence"] = _row(confidence, seq)
        c, t = rows["confidence"], rows["best_overall"]
        sec.finding(
            f"The best probe on the calibration half's validation records ({t['probe']}) "
            f"scores AUROC {t['auroc']:.3f} (95% CI {t['auroc_ci'][0]:.3f} to "
            f"{t['auroc_ci'][1]:.3f}) on the evaluation half against {c['auroc']:.3f} "
            f"({c['auroc_ci'][0]:.3f} to {c['auroc_ci'][1]:.3f}) for a probe on the model's "
            f"confidence (max log-prob, entropy): a gain of {t['gain_over_confidence'][0]:+.3f} "
            f"({t['gain_over_confidence'][1]:+.3f} to {t['gain_over_confidence'][2]:+.3f}). "
            f"On PII tokens alone (memorized vs not recalled) {t['pii_auroc']:.3f} against "
            f"{c['pii_auroc']:.3f}; among tokens matched for confidence "
            f"({t['matched_coverage']:.0%} of the memorized ones found a match) "
            f"{t['matched_auroc']:.3f} against {c['matched_auroc']:.3f}"
            + (f"; per record (mean score; recited or not) {t['sequence_auroc']:.3f} against "
               f"{membership[1]:.3f} for the best membership score ({membership[0]})"
               if t["sequence_auroc"] is not None and membership else "") + ". "
            + (f"The best probe on one residual site ({best['probe']}) scores "
               f"{best['auroc']:.3f}, {best['pii_auroc']:.3f} on PII tokens alone"
               + (": it finds PII values, not which of them the model recalls."
                  if best["pii_auroc"] < c["pii_auroc"] else ".")
               if best["probe"] != t["probe"] else ""))
    # Token view: recited and other members and non-members of the evaluation half.
    s, recited = d.splits, {q.id for q in d.recited("evaluation")}
    shown = ([q for q in s.evaluation if q.id in recited][:2]
             + [q for q in s.evaluation if q.id not in recited][:2]
             + s.evaluation_nonmembers[:2])
    sec.html(token_view(_token_rows(d, shown, probe, labels.tokens), view_id="token-view"))
    others = res[~res["probe"].isin(store.sites)]
    return {"best_probe": best["probe"], "auroc": float(best["auroc"]),
            "sites_by_validation_auroc": list(
                res[res["probe"].isin(store.sites)].sort_values("val_auroc", ascending=False)
                ["probe"]),
            "other_probes_auroc": dict(zip(others["probe"], others["auroc"].astype(float),
                                           strict=True)),
            "auroc_ci": [float(best["auroc_ci_low"]), float(best["auroc_ci_high"])],
            "selectivity": float(best["selectivity"]),
            "matched_auroc": float(best["matched_auroc"]),
            "confidence_matched_auroc": (float(confidence["matched_auroc"])
                                         if confidence is not None else None),
            "tpr_at_1pct_fpr": float(best["tpr_at_1pct_fpr"]),
            **rows, "best_membership_auroc": dict([membership]) if membership else None,
            "token_baselines": summary["token_baselines"]}
