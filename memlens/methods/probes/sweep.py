"""The probe sweep: a probe per site and per combination of sites, fitted together (tasks
of one width as one batched problem), scored on held-out tokens, with control tasks."""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from memlens.core.errors import ConfigError, DataError
from memlens.core.progress import progress as progress_bar
from memlens.methods.probes.artifact import Probe
from memlens.methods.probes.data import CONFIDENCE, ProbeData
from memlens.methods.probes.metrics import (
    auroc_or_nan,
    best_threshold,
    class_gap,
    confidence_gain,
    matched_auroc,
    score_metrics,
    sequence_aurocs,
    token_baselines,
)
from memlens.methods.probes.solver import RowChunks, fit_chunks, fit_sklearn, standardize, trim_heap

__all__ = ["FittedProbe", "ProbeSweep", "control_labels", "fit_probes", "probe_sweep"]


@dataclass
class ProbeSweep:
    results: pd.DataFrame           # one row per (probe, trainer)
    probes: dict[str, Probe]
    baselines: dict                 # token- and sequence-level baselines on the test split
    token_scores: pd.DataFrame      # test tokens with each probe's score


def _site_layer(site: str) -> tuple[int, str]:
    parts = site.split(".")
    if parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), ".".join(parts[2:])
    return -1, site


def _probe_layer(sites: list[str]) -> tuple[int, str]:
    """A probe's layer and kind: a site's own; for a combination with one block site
    (``lens+confidence+blocks.3.hook_resid_post``), that block, its kind named with the
    rest (``lens+confidence+hook_resid_post``); other combinations are layerless."""
    if len(sites) == 1:
        return _site_layer(sites[0])
    layered = [s for s in sites if _site_layer(s)[0] >= 0]
    if len(layered) != 1:
        return -1, "combined"
    layer, kind = _site_layer(layered[0])
    return layer, "+".join([s for s in sites if s != layered[0]] + [kind])


def control_labels(token_ids: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Hewitt & Liang control task: a random label per token type, same positive rate."""
    salt = f"{seed}:".encode()
    u = np.array([zlib.crc32(salt + str(int(t)).encode()) / 2**32 for t in token_ids])
    return (u < rate).astype(np.int64)


def probe_sweep(data: ProbeData, sequences: pd.DataFrame | None = None,
                combos: dict[str, list[str]] | None = None, trainers=("torch",),
                control: bool = True, progress: bool = True) -> ProbeSweep:
    """Fit a probe per site (and per named combination of sites); score held-out tokens.

    ``combos`` maps a probe name to a list of sites whose features are concatenated
    (``confidence`` adds the model's max log-prob and entropy).
    """
    cfg, tok = data.config, data.tokens
    tr, va, te = data.mask("train"), data.mask("val"), data.mask("test")
    y = tok["y"].to_numpy()
    if y[te].sum() == 0 or y[tr].sum() == 0:
        raise DataError("no positive tokens in the train or test split; label more "
                         "memorized sequences or change ProbeConfig.split")
    groups = tok["id"].to_numpy()
    confidence = tok[["max_logprob", "entropy"]].to_numpy()
    named = {s: [s] for s in data.features} | (combos or {})
    tasks = {name: (sites, y) for name, sites in named.items()}
    if control:
        yc = control_labels(tok["token_id"].to_numpy(), y[tr].mean(), cfg.seed)
        tasks |= {f"control:{name}": (sites, yc) for name, sites in named.items()}
    identity = {}
    if data.identity is not None:
        identity = data.identity.with_changes(kind="probe", config=asdict(cfg),
                                              inputs=data.inputs).to_json()
    rows, probes, scores = [], {}, {}
    index = {k: np.flatnonzero(m) for k, m in (("train", tr), ("val", va), ("test", te))}
    pii = (tok["label"] != "generic").to_numpy()[te]
    for trainer in trainers:
        t0 = time.perf_counter()
        fitted = fit_probes(data, tasks, index, trainer, progress)
        seconds = time.perf_counter() - t0
        for name, (sites, yy) in tasks.items():
            f = fitted[name]
            probe = Probe(sites, f.weight, f.bias, f.mean, f.std, 0.0, cfg.align,
                          class_gap=f.class_gap, identity=identity)
            probe.threshold = best_threshold(yy[va], f.val_score)
            s = f.test_score
            m = score_metrics(yy[te], s, groups[te], probe.threshold, cfg.n_bootstrap,
                              cfg.seed)
            m["matched_auroc"], m["matched_coverage"] = matched_auroc(yy[te], s, confidence[te])
            # Memorized PII against PII the model does not recall: template tokens left out,
            # so a probe that only finds PII scores nothing for it.
            m["pii_auroc"] = auroc_or_nan(yy[te][pii], s[pii])
            m["val_auroc"] = auroc_or_nan(yy[va], f.val_score)
            probe.metrics = m
            layer, kind = _probe_layer(sites)
            rows.append({"probe": name, "trainer": trainer, "layer": layer, "kind": kind,
                         "control": name.startswith("control:"), "n_features": len(f.mean),
                         "fit_seconds_all": seconds, **m})
            if trainer == trainers[0] and not name.startswith("control:"):
                probes[name] = probe
                scores[name] = s
    results = pd.DataFrame(rows)
    if CONFIDENCE in scores:  # each probe's gain over the model's own confidence
        gains = {name: confidence_gain(y[te], s, scores[CONFIDENCE], groups[te],
                                       cfg.n_bootstrap, cfg.seed) for name, s in scores.items()}
        first = results["trainer"] == trainers[0]
        for i, key in enumerate(("gain_over_confidence", "gain_ci_low", "gain_ci_high")):
            results[key] = [gains[p][i] if f and p in gains else np.nan
                            for p, f in zip(results["probe"], first, strict=True)]
    test_tok = tok[te].reset_index(drop=True)
    token_scores = pd.concat([test_tok, pd.DataFrame(scores)], axis=1)
    baselines = token_baselines(test_tok)
    if sequences is not None:
        baselines |= sequence_aurocs(token_scores, sequences, list(probes))
    if control:
        ctrl = results[results["control"]].set_index(["probe", "trainer"])["auroc"]
        results["control_auroc"] = [
            ctrl.get((f"control:{p}", t), np.nan) for p, t in zip(results["probe"],
                                                                   results["trainer"],
                                                                   strict=True)]
        results["selectivity"] = results["auroc"] - results["control_auroc"]
    return ProbeSweep(results, probes, baselines, token_scores)


@dataclass
class FittedProbe:
    """One fit: weights on standardized features, the standardization, the gap between the
    class means on training tokens, and the scores of the validation and test tokens."""

    weight: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray
    class_gap: float
    val_score: np.ndarray
    test_score: np.ndarray


def fit_probes(data: ProbeData, tasks: dict[str, tuple[list[str], np.ndarray]],
               index: dict[str, np.ndarray], trainer: str = "torch", progress: bool = True
               ) -> dict[str, FittedProbe]:
    """Fit every task (name -> sites whose features are concatenated, labels per token) on
    the ``index["train"]`` tokens, early-stopped and scored on ``val``, scored on ``test``.

    ``torch``: tasks of one width are one batched problem, streamed from the store in
    chunks of ``ProbeConfig.chunk_mb``; ``sklearn``: one in-memory fit per task (the
    reference).
    """
    if trainer not in ("torch", "sklearn"):
        raise ConfigError(f"trainer {trainer!r}: choose 'torch' or 'sklearn'")
    cfg, out = data.config, {}
    if trainer == "sklearn":
        for name, (sites, y) in progress_bar(tasks.items(), disable=not progress,
                                             desc="sklearn probes"):
            x = data.combined(sites, index["train"]).astype(np.float32)
            mean, std = standardize(x)
            w, b = fit_sklearn((x - mean) / std, y[index["train"]], cfg)
            score = [1 / (1 + np.exp(-(((data.combined(sites, index[k]).astype(np.float32)
                                         - mean) / std) @ w + b))) for k in ("val", "test")]
            out[name] = FittedProbe(w, b, mean, std, class_gap(x, y[index["train"]]), *score)
        return out
    widths: dict[int, list[str]] = {}
    for name, (sites, _) in tasks.items():
        widths.setdefault(data.combined(sites, index["train"][:1]).shape[1], []).append(name)
    for d, names in progress_bar(widths.items(), disable=not progress, desc="probes",
                                 unit="width"):
        chunk_rows = max(256, cfg.chunk_mb * 2**20 // (4 * (d + 1) * len(names)))
        out |= _fit_width(data, {n: tasks[n] for n in names}, index, d, chunk_rows)
    return out


def _reader(data: ProbeData, site_lists: list[list[str]], index: np.ndarray):
    """``read(start, stop)``: each probe's raw features at tokens ``index[start:stop]``
    (site lists shared by several probes are read once)."""
    def read(start: int, stop: int) -> list[np.ndarray]:
        done: dict[tuple, np.ndarray] = {}
        for sites in site_lists:
            if tuple(sites) not in done:
                done[tuple(sites)] = data.combined(sites, index[start:stop])
        return [done[tuple(sites)] for sites in site_lists]
    return read


def _fit_width(data, tasks, index, d, chunk_rows) -> dict[str, FittedProbe]:
    cfg = data.config
    site_lists = [sites for sites, _ in tasks.values()]
    y_train = np.stack([y[index["train"]] for _, y in tasks.values()]).astype(np.float64)
    # One pass for the standardization and the class means (float64 sums).
    read = _reader(data, site_lists, index["train"])
    n = len(index["train"])
    total, total_sq, total_pos = (np.zeros((len(tasks), d)) for _ in range(3))
    for start in range(0, n, chunk_rows):
        for i, x in enumerate(read(start, min(start + chunk_rows, n))):
            total[i] += x.sum(0, dtype=np.float64)
            total_sq[i] += np.square(x, dtype=np.float64).sum(0)
            total_pos[i] += y_train[i, start:start + len(x)] @ x
        trim_heap()
    n_pos = y_train.sum(1, keepdims=True)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean ** 2, 0))
    std = np.where(std > 1e-6, std, 1.0)
    gaps = np.linalg.norm(total_pos / np.maximum(n_pos, 1)
                          - (total - total_pos) / np.maximum(n - n_pos, 1), axis=1)

    def chunks(split):
        return RowChunks(_reader(data, site_lists, index[split]), len(index[split]),
                         mean.astype(np.float32), std.astype(np.float32), chunk_rows,
                         cfg.device)

    fits = fit_chunks(chunks("train"), y_train, chunks("val"),
                      np.stack([y[index["val"]] for _, y in tasks.values()]), cfg)
    W = torch.tensor(np.stack([np.append(w, b) for w, b in fits]), dtype=torch.float32,
                     device=cfg.device)
    scores = {k: torch.sigmoid(chunks(k).dot(W)).cpu().numpy() for k in ("val", "test")}
    return {name: FittedProbe(w, b, mean[i].astype(np.float32), std[i].astype(np.float32),
                              float(gaps[i]), scores["val"][i], scores["test"][i])
            for i, (name, (w, b)) in enumerate(zip(tasks, fits, strict=True))}
