"""The artifact chain: each step reads the artifacts the steps before it wrote.

    label      model + JSONL            -> labels/   (sequences, tokens, summary + identity)
    capture    model + labels/          -> store/    (activations, checked against labels)
    probes     labels/ + store/         -> probes/   (a probe per site, results, figure)
    kfac       model + JSONL            -> factors   (K-FAC A and G per layer)
    edit       model + factors + labels -> model dir (aimed at the sequences labels recite)
    localize   model + labels/          -> neurons/  (a NeuronAblation and every score)
    steer      model + a probe          -> steering/ (a Steering setup), generations

The command line, the demo and ``probes/train.py`` all run these functions; every artifact
carries an identity header and is refused, by name, when the model or corpus behind it
changed.

Example:
    >>> labels = label_step(handle, "organisms/tiny", "out/labels")
    >>> store = capture_step(handle, labels, "out/store", CaptureConfig(sites=["blocks.*"
    ...                      ".hook_resid_post"]))
    >>> summary = train_probes(labels, store, "out/probes")
"""

from __future__ import annotations

import fnmatch
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from memlens.capture import ActivationStore, CaptureConfig, capture
from memlens.core.errors import ConfigError, DataError, check_keys
from memlens.core.identity import Identity, corpus_hash, read_artifact, write_artifact
from memlens.core.model import ModelHandle
from memlens.core.storage import exclusive, prepare_output
from memlens.curvature import (
    Factors,
    apply_weights,
    budget_weights,
    eigenbasis,
    kfac_weights,
    memorization_gradient,
    rho_layers,
)
from memlens.figures import layer_sweep_figure
from memlens.labels import LabelConfig, Labels, label, labelable, manifest_roles, read_sequences
from memlens.localize import LocalizeConfig, NeuronAblation, find_neurons
from memlens.probes import CONFIDENCE, ProbeConfig, ProbeData, probe_sweep


def label_step(handle: ModelHandle, data: str | Path, out: str | Path,
               cfg: LabelConfig | None = None, roles: tuple[str, ...] | None = None,
               progress: bool = True, reuse: bool = False) -> Labels:
    """Label the sequences of ``data`` (JSONL or organism dir) into ``out``. With ``reuse``,
    labels already in ``out`` for the same model, sequences and config are loaded instead."""
    cfg = cfg or LabelConfig()
    prepare_output(out, "labels", marker="summary.json")
    seqs = read_sequences(data, handle.tokenizer, roles=roles or manifest_roles(data),
                          max_tokens=cfg.prefix + cfg.suffix)
    if reuse and (Path(out) / "summary.json").is_file():
        done = Labels.load(out)
        ident = done.identity
        if (ident.model_hash, ident.corpus_hash, ident.config) == (
                handle.weights_hash(), corpus_hash(labelable(seqs, cfg)),
                json.loads(json.dumps(asdict(cfg)))):
            return done
    labels = label(handle, seqs, cfg, progress=progress)
    labels.save(out)
    return labels


def capture_step(handle: ModelHandle, labels: Labels | str | Path, out: str | Path,
                 cfg: CaptureConfig, progress: bool = True) -> ActivationStore:
    """Capture the labeled sequences (a labels dir or :class:`Labels`) into a store."""
    labels = labels if isinstance(labels, Labels) else Labels.load(labels)
    return capture(handle, labels, cfg, out, progress=progress)


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
    from memlens.organism import organism_path

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


def recited_targets(labels: Labels, ids: set[str] | None = None, limit: int | None = None
                    ) -> list[list[int]]:
    """Token ids (cut to prefix + suffix) of the sequences the labels say the model recites,
    optionally only those with ids in ``ids``. ``limit`` keeps that many, taken in turn from
    each duplication count (most repeated first), so a sample spans the counts rather than
    the corpus order's first ones."""
    cfg = labels.config
    seqs = [s for s in labels.to_sequences(recited=True) if ids is None or s.id in ids]
    if not seqs:
        raise DataError(f"the model recites none of the sequences in {labels.where}; there "
                        "is nothing to aim at")
    if limit is not None:
        counts = sorted({s.duplication or 0 for s in seqs}, reverse=True)
        queues = [[s for s in seqs if (s.duplication or 0) == c] for c in counts]
        seqs = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
        seqs = seqs[:limit]
    return [s.token_ids[:cfg.prefix + cfg.suffix] for s in seqs]


def kfac_edit_step(handle: ModelHandle, factors: Factors | str | Path, out: str | Path,
                   rho: float | dict[str, float] | None = None,
                   kl_budget: float | None = None, labels: Labels | None = None) -> Path:
    """Edit the model with its K-FAC factors and save it to ``out``: the keep-mass edit
    (``rho``), or a KL-budgeted one, aimed at what ``labels`` say it recites."""
    if (rho is None) == (kl_budget is None):
        raise ConfigError("give exactly one of rho (keep-mass edit) or kl_budget")
    if labels is not None and kl_budget is None:
        raise ConfigError("labels aim a --kl-budget edit; drop them or use --kl-budget")
    if Path(out).resolve() == Path(handle.name).resolve():
        raise ConfigError(f"--out {out} is the model being edited; choose a new directory")
    prepare_output(out, "edit", marker="memlens_edit.json")
    where = str(factors) if not isinstance(factors, Factors) else "the factors"
    factors = factors if isinstance(factors, Factors) else Factors.load(factors)
    factors.identity.check_model(handle, where)
    # Layers a keep-mass edit leaves alone need no eigendecomposition.
    edited = rho_layers(factors.layers, rho) if rho is not None else None
    if edited == []:
        raise ConfigError(f"rho {rho!r} names none of the factor file's layers (e.g. "
                          f"{factors.layers[:2]}); use 'mlp'-style globs like "
                          "'model.layers.3.*=0.6' or one number for every layer")
    basis = eigenbasis(factors, edited)
    meta: dict = {"factors": where}
    if rho is not None:
        weights = kfac_weights(handle, basis, rho)
        meta["rho"] = rho
    else:
        grads = None
        if labels is not None:
            labels.check_model(handle)
            targets = recited_targets(labels)
            grads = memorization_gradient(handle, targets, factors.layers,
                                          start=labels.config.prefix)
            meta["memorized"] = {"labels": labels.where, "n_recited": len(targets)}
        weights = budget_weights(handle, basis, kl_budget, grads)
        meta["kl_budget"] = kl_budget
    edit = apply_weights(handle, weights)
    try:
        return edit.save(out, metadata=meta)
    finally:
        edit.restore()


def localize_step(handle: ModelHandle, labels: Labels, out: str | Path | None,
                  cfg: LocalizeConfig | None = None, budget: float = 0.01,
                  ids: set[str] | None = None, max_targets: int | None = None
                  ) -> NeuronAblation:
    """Score every MLP neuron for the sequences ``labels`` say the model recites (non-members
    as clean text), keep the top ``budget`` of each layer; saved to ``out`` with the scores."""
    labels.check_model(handle)
    if out is not None:
        prepare_output(out, "ablation", marker="ablation.json")
    targets = recited_targets(labels, ids, limit=max_targets)
    clean = [s.token_ids for s in labels.to_sequences() if s.duplication == 0
             and (ids is None or s.id in ids)]
    _, ablation = find_neurons(handle, targets, clean or None, cfg or LocalizeConfig(),
                               budget, inputs={"labels": labels.identity})
    if out is not None:
        ablation.save(out)
    return ablation

