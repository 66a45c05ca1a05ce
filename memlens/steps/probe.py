"""Probe step: labels and a store -> a probe per site, the sweep's results and figure;
or the whole label -> capture -> probe run from one TOML config."""

from __future__ import annotations

import fnmatch
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from memlens.core.errors import ConfigError, check_keys
from memlens.core.identity import Identity, read_artifact, write_artifact
from memlens.core.storage import exclusive, prepare_output
from memlens.data.labels import (
    LabelConfig,
    Labels,
)
from memlens.data.store import ActivationStore, CaptureConfig
from memlens.methods.probes import CONFIDENCE, ProbeConfig, ProbeData, probe_sweep
from memlens.report.figures import layer_sweep_figure
from memlens.steps.capture import capture_step
from memlens.steps.label import label_step

__all__ = ["CONFIGS", "check_config", "expand_sites", "load_config", "run_config", "train_probes"]


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
                 keep: tuple[str, ...] = ()) -> dict:
    """Fit a probe per captured site (and per combo) from a labels dir and the store captured
    from it; write results.json, results.parquet, layer_sweep.html and every single-site
    probe, plus the best combined one, to ``out/probes/NAME``. Returns the summary. ``out``
    may already hold the labels and store directories and the files named in ``keep``."""
    t0 = time.perf_counter()
    labels = labels if isinstance(labels, Labels) else Labels.load(labels)
    store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    out = prepare_output(out, "probes", marker="results.json",
                         allowed=("labels", "store", "probes", *keep))
    data = ProbeData.from_store(store, labels, config or ProbeConfig(), split=split)
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
    single = res[(res["kind"] != "combined") & (res["probe"] != CONFIDENCE)]
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
    identity = Identity(**{**data.identity.to_json(), "kind": "probes", "inputs": data.inputs,
                           "config": json.loads(json.dumps(asdict(data.config)))})
    write_artifact(out, "results.json", summary, identity)
    layer_sweep_figure(sweep.results, sweep.baselines, trainers[0]).write_html(
        out / "layer_sweep.html", include_plotlyjs=True)
    keep = set(single["probe"]) | {best["probe"]}
    for name in keep:
        sweep.probes[name].save(out / "probes" / name.replace("+", "__"))
    return summary


CONFIGS = Path(__file__).parent / "configs"


def load_config(config: str | Path | dict) -> dict:
    """A probe run's settings: a TOML file, the name of one that ships with memlens
    (``"organism"``: ``memlens/configs/organism.toml``), or the dict itself.

    Example:
        >>> cfg = load_config("organism")
        >>> cfg["output"]["dir"] = "/tmp/probes"
        >>> run_config(cfg)
    """
    import tomllib

    if isinstance(config, dict):
        check_config(config, "the config dict")
        return config
    path = Path(config)
    if not path.is_file() and (CONFIGS / f"{config}.toml").is_file():
        path = CONFIGS / f"{config}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIGS.glob("*.toml"))
        raise ConfigError(f"no config file {config}; give a TOML file or one of the configs "
                          f"memlens ships: {shipped}")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    check_config(cfg, path.name)
    return cfg | {"_source": str(path)}


def check_config(cfg: dict, source: str = "the config") -> None:
    """Refuse an unknown section or key (a misspelt ``positiv``) in one line naming it, its
    section and the nearest valid key, before any work starts."""
    from dataclasses import fields

    sections = {"model": {"organism", "arch", "seed", "path", "data"},
                "labels": {f.name for f in fields(LabelConfig)} | {"roles"},
                "capture": {f.name for f in fields(CaptureConfig)},
                "probe": {f.name for f in fields(ProbeConfig)} | {"trainers"},
                "combos": None, "output": {"dir"}}
    check_keys([k for k in cfg if not k.startswith("_")], sections, source)
    for name, keys in sections.items():
        if keys is not None and isinstance(cfg.get(name), dict):
            check_keys(cfg[name], keys, f"[{name}] of {source}")


def run_config(config: str | Path | dict, progress: bool = True) -> dict:
    """Label, capture and train probes from one config (see :func:`load_config`); each
    step is reused when its artifact is already there for the same model and settings."""
    from memlens.core.model import load_model
    from memlens.data.organism import organism_path

    cfg = load_config(config)
    source = cfg.get("_source", "a config dict")
    model_cfg = cfg.get("model", {})
    if "path" in model_cfg:
        model_dir = Path(model_cfg["path"])
    else:
        model_dir = organism_path(model_cfg.get("organism", "small"),
                                  model_cfg.get("arch", "llama"), model_cfg.get("seed", 0))
    out = Path(cfg.get("output", {}).get("dir", "experiments/results/probes"))
    handle = load_model(model_dir)
    lab_cfg = dict(cfg.get("labels", {}))
    roles = tuple(lab_cfg.pop("roles", ("canary", "nonmember")))
    data = Path(model_cfg.get("data", model_dir))
    labels = label_step(handle, data, out / "labels", LabelConfig(generate=False, **lab_cfg),
                        roles=roles, progress=progress, reuse=True)
    store = capture_step(handle, labels, out / "store",
                         CaptureConfig(positions="all", **cfg.get("capture", {})), progress)
    p = dict(cfg.get("probe", {}))
    trainers = tuple(p.pop("trainers", ("torch",)))
    keep = (Path(source).name,) if "_source" in cfg else ()
    summary = train_probes(labels, store, out, ProbeConfig(**p), cfg.get("combos", {}),
                           trainers, progress=progress, keep=keep)
    summary["config"] = source
    meta, identity = read_artifact(out, "results.json", "probes", "memlens probe train")
    write_artifact(out, "results.json", {**meta, "config": source}, identity)
    return summary
