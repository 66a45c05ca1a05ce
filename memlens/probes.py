"""Linear probes that read memorization from activations, one per site (or site set).

A probe is a logistic regression on standardized activations. Splits are grouped
by sequence and stratified by duplication count; every metric is on held-out
sequences, with bootstrap confidence intervals over sequences.

Example:
    >>> data = ProbeData.from_store(store, Labels.load("labels/"), ProbeConfig())
    >>> sweep = probe_sweep(data, labels.sequences)
    >>> sweep.results.sort_values("auroc").tail()
    >>> sweep.probes["blocks.3.hook_resid_post"].direction()   # for steering
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from memlens.capture import ActivationStore
from memlens.core.errors import ConfigError, DataError
from memlens.core.identity import Identity, read_artifact, state_hash, write_artifact
from memlens.core.progress import progress as progress_bar
from memlens.core.storage import atomic_dir
from memlens.labels import Labels

CONFIDENCE = "confidence"  # pseudo-site: the model's max log-prob and entropy


@dataclass
class ProbeConfig:
    """Which tokens, which split, how to fit.

    ``align="predicting"`` reads the activation at the position that predicts the
    token (t - 1): where the model recalls it. ``"token"`` reads position t.
    """

    positive: tuple[str, ...] = ("memorized",)
    negative: tuple[str, ...] = ("generic", "not_memorized")
    align: str = "predicting"
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    l2: float = 1e-3
    max_iter: int = 200
    patience: int = 2
    n_bootstrap: int = 200
    seed: int = 0
    device: str = "cpu"  # where the batched torch trainer runs ("cuda" on a GPU)

    def __post_init__(self):
        self.positive, self.negative = tuple(self.positive), tuple(self.negative)
        self.split = tuple(self.split)
        if self.align not in ("predicting", "token"):
            raise ConfigError(f"align={self.align!r}; choose 'predicting' or 'token'")
        if abs(sum(self.split) - 1) > 1e-6 or len(self.split) != 3:
            raise ConfigError(f"split={self.split} must be three fractions (train, val, test) "
                             "summing to 1")
        if set(self.positive) & set(self.negative):
            raise ConfigError(f"labels {set(self.positive) & set(self.negative)} are both "
                             "positive and negative")


def split_sequences(seq_dup: pd.Series, fractions, seed: int) -> pd.Series:
    """train/val/test per sequence id, stratified by duplication count."""
    rng = np.random.default_rng(seed)
    out = {}
    for _, ids in seq_dup.groupby(seq_dup.fillna(-1)).groups.items():
        ids = rng.permutation(np.asarray(ids))
        n_train = int(round(fractions[0] * len(ids)))
        n_val = int(round(fractions[1] * len(ids)))
        for k, i in enumerate(ids):
            out[i] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return pd.Series(out)


@dataclass
class ProbeData:
    """Features per site, aligned with one row per labeled token."""

    tokens: pd.DataFrame                  # id, position, label, y, split, duplication, ...
    features: dict[str, np.ndarray]       # site -> [n_tokens, d] (float32)
    config: ProbeConfig
    identity: Identity | None = None      # the store's; probes trained here inherit it
    inputs: dict = field(default_factory=dict)

    @classmethod
    def from_store(cls, store: ActivationStore, labels: Labels | pd.DataFrame,
                   config: ProbeConfig | None = None, sites: list[str] | None = None,
                   split: dict[str, str] | None = None) -> ProbeData:
        """Join a capture store with labels (``Labels.load(dir)``, or a labels ``tokens``
        table). Labels are checked against the store: same model, same sequences.

        ``split`` (sequence id -> train/val/test) replaces the random grouped split.
        """
        config = config or ProbeConfig()
        inputs = {"store": store.identity}
        if isinstance(labels, Labels):
            labels.identity.check_corpus(store.identity, labels.where, str(store.path))
            inputs["labels"] = labels.identity
            token_labels = labels.tokens
        else:
            token_labels = labels
        keep = token_labels["label"].isin(config.positive + config.negative)
        tok = token_labels[keep].copy()
        tok["id"] = tok["id"].astype(str)
        if tok.empty:
            raise DataError(f"no tokens labeled {config.positive + config.negative}; "
                            "check the labels table")
        rows = store.tokens[["id", "position"]].copy()
        rows["row"] = np.arange(len(rows))
        shift = 1 if config.align == "predicting" else 0
        tok["feature_position"] = tok["position"] - shift
        tok = tok.merge(rows.rename(columns={"position": "feature_position"}),
                        on=["id", "feature_position"], how="inner")
        if len(tok) < keep.sum():
            missing = int(keep.sum() - len(tok))
            raise DataError(f"{missing} labeled tokens have no captured activation at "
                            f"align={config.align!r}; capture with --positions all")
        tok["y"] = tok["label"].isin(config.positive).astype(np.int64)
        if split is None:
            per_seq = tok.groupby("id")["duplication"].first()
            split = split_sequences(per_seq, config.split, config.seed)
        tok["split"] = tok["id"].map(split)
        if tok["split"].isna().any():
            raise DataError(f"{tok.loc[tok['split'].isna(), 'id'].nunique()} labeled "
                            "sequences have no train/val/test assignment in split")
        features = {}
        for site in sites or store.sites:
            arr = store.tensor(site).numpy()
            features[site] = arr[tok["row"].to_numpy()].reshape(len(tok), -1)
        features[CONFIDENCE] = tok[["max_logprob", "entropy"]].to_numpy(np.float32)
        return cls(tok.reset_index(drop=True), features, config, store.identity,
                   {k: v.digest for k, v in inputs.items()})

    def combined(self, sites: list[str]) -> np.ndarray:
        return np.concatenate([self.features[s] for s in sites], axis=1)

    def mask(self, split: str) -> np.ndarray:
        return (self.tokens["split"] == split).to_numpy()


# --------------------------------------------------------------------------- fitting


def _standardize(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(0)
    std = x_train.std(0)
    return mean, np.where(std > 1e-6, std, 1.0)


def _class_weights(y: np.ndarray) -> np.ndarray:
    n_pos = max(int(y.sum()), 1)
    n_neg = max(len(y) - n_pos, 1)
    return np.where(y == 1, len(y) / (2 * n_pos), len(y) / (2 * n_neg))


def fit_sklearn(x: np.ndarray, y: np.ndarray, config: ProbeConfig) -> tuple[np.ndarray, float]:
    """The reference fit: class-balanced L2 logistic regression (standardized x)."""
    from sklearn.linear_model import LogisticRegression

    # Same objective as fit_torch: mean weighted log-loss + l2/2 |w|^2.
    clf = LogisticRegression(C=1.0 / (config.l2 * len(y)), max_iter=2000, tol=1e-6)
    clf.fit(x, y, sample_weight=_class_weights(y))
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


def fit_torch(xs: list[np.ndarray], y: np.ndarray, x_vals: list[np.ndarray], y_val: np.ndarray,
              config: ProbeConfig, device: str = "cpu", newton_max_d: int = 1024
              ) -> list[tuple[np.ndarray, float]]:
    """Fit one probe per feature matrix at once, as one batched problem.

    Every matrix must have the same width. Widths up to ``newton_max_d`` use batched
    Newton steps (IRLS: a few passes, each one [sites, d, d] solve); wider ones L-BFGS.
    Early stopping: each probe keeps the weights of its best validation loss, and
    fitting stops once none has improved (by 1e-4 relative) for ``patience`` steps.
    """
    d = xs[0].shape[1]
    if any(x.shape[1] != d for x in xs):
        raise ValueError("fit_torch batches probes of one width; group them by width")

    def stack(mats):  # [sites, n, d + 1]: a ones column carries the bias
        x = torch.ones(len(mats), mats[0].shape[0], d + 1, device=device)
        for i, m in enumerate(mats):
            x[i, :, :d] = torch.from_numpy(m)
        return x

    X, Xv = stack(xs), stack(x_vals)
    Y = torch.as_tensor(y, dtype=torch.float32, device=device)
    Yv = torch.as_tensor(y_val, dtype=torch.float32, device=device)
    sw = torch.as_tensor(_class_weights(y), dtype=torch.float32, device=device) / len(y)
    swv = torch.as_tensor(_class_weights(y_val), dtype=torch.float32, device=device) / len(y_val)
    reg = torch.full((d + 1,), config.l2, device=device)
    reg[-1] = 0.0  # no penalty on the bias
    W = torch.zeros(len(xs), d + 1, device=device)

    def loss(Xm, Ym, w, weights):
        return _weighted_bce(torch.bmm(Xm, weights[:, :, None])[..., 0], Ym, w)

    def objective(weights):
        return loss(X, Y, sw, weights) + 0.5 * (reg * weights ** 2).sum(1)

    best = torch.full((len(xs),), float("inf"), device=device)
    best_W = W.clone()
    stale = 0
    z = None
    if d <= newton_max_d:
        steps = config.max_iter

        def step_fn():
            nonlocal z
            W_new, z, converged = _newton_step(X, Y, sw, reg, W, z)
            return W_new, converged
    else:
        Wp = W.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([Wp], lr=1, max_iter=5, history_size=20,
                                line_search_fn="strong_wolfe")
        steps = max(1, config.max_iter // 5)

        def step_fn():
            def closure():
                opt.zero_grad()
                f = objective(Wp).sum()
                f.backward()
                return f
            opt.step(closure)
            return Wp.detach().clone(), False

    for _ in range(steps):
        W, converged = step_fn()
        with torch.no_grad():
            val = loss(Xv, Yv, swv, W)
            better = val < best * (1 - 1e-4)
            best = torch.where(better, val, best)
            best_W[better] = W[better]
        stale = 0 if better.any() else stale + 1
        if stale >= config.patience or converged:
            break
    return [(best_W[i, :d].cpu().numpy(), float(best_W[i, d])) for i in range(len(xs))]


def _weighted_bce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-probe weighted log-loss of logits ``z`` [probes, n]."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        z, y.expand_as(z), reduction="none")
    return (bce * w).sum(1)


@torch.no_grad()
def _newton_step(X, Y, sw, reg, W, z=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One damped Newton step per probe (halved where it would raise the objective).

    Takes and returns the logits ``z = X @ W`` so that each step reads X three times:
    gradient, curvature (on a row subset) and the new logits. Also returns whether every
    probe had converged before the step.
    """
    def objective(z, W):
        return _weighted_bce(z, Y, sw) + 0.5 * (reg * W ** 2).sum(1)

    if z is None:
        z = torch.bmm(X, W[:, :, None])[..., 0]
    p = torch.sigmoid(z)
    grad = torch.bmm(X.transpose(1, 2), (sw * (p - Y))[..., None])[..., 0] + reg * W
    curv = sw * p * (1 - p)
    # Subsampled Newton: the curvature from an evenly spaced subset of rows (rescaled);
    # the gradient stays exact, so the optimum is the same and each step costs far less.
    stride = max(1, X.shape[1] // max(2048, 4 * X.shape[2]))
    Xh, ch = X[:, ::stride], curv[:, ::stride] * (curv.sum(1, keepdim=True)
                                                   / curv[:, ::stride].sum(1, keepdim=True))
    hess = torch.bmm(Xh.transpose(1, 2), Xh * ch[..., None]) + torch.diag(reg + 1e-8)
    step = torch.linalg.solve(hess, grad)
    # Newton decrement: half of it bounds the remaining drop of the objective.
    converged = bool(((grad * step).sum(1) < 1e-6).all())
    before = objective(z, W)
    dz = torch.bmm(X, step[:, :, None])[..., 0]  # logits move linearly with the step
    scale = torch.ones(len(W), 1, device=W.device)
    for _ in range(8):
        worse = objective(z - scale * dz, W - scale * step) > before + 1e-12
        if not worse.any():
            break
        scale[worse] *= 0.5
    return W - scale * step, z - scale * dz, converged


# --------------------------------------------------------------------------- metrics


def tpr_at_fpr(y: np.ndarray, score: np.ndarray, fpr_max: float = 0.01) -> float:
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.interp(fpr_max, fpr, tpr))


def _point_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    pred = score >= threshold
    tp = float((pred & (y == 1)).sum())
    f1 = 2 * tp / max(pred.sum() + y.sum(), 1)
    return {"auroc": float(roc_auc_score(y, score)), "accuracy": float((pred == y).mean()),
            "f1": float(f1), "tpr_at_1pct_fpr": tpr_at_fpr(y, score)}


def score_metrics(y, score, groups, threshold: float, n_bootstrap: int, seed: int) -> dict:
    """AUROC, accuracy, F1 and TPR at 1% FPR, each with a 95% interval from resampling
    whole sequences (``n_bootstrap`` times)."""
    point = _point_metrics(y, score, threshold)
    if n_bootstrap <= 0:
        return point | {f"{k}_ci_{e}": float("nan") for k in point for e in ("low", "high")}
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    draws = []
    for _ in range(n_bootstrap):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if 0 < y[idx].sum() < len(idx):
            draws.append(_point_metrics(y[idx], score[idx], threshold))
    out = dict(point)
    for k in point:
        vals = [d[k] for d in draws]
        out[f"{k}_ci_low"] = float(np.percentile(vals, 2.5))
        out[f"{k}_ci_high"] = float(np.percentile(vals, 97.5))
    return out


def _best_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold with the best F1 on validation tokens."""
    cands = np.unique(np.quantile(score, np.linspace(0.01, 0.99, 99)))
    f1s = [f1_score(y, score >= c) for c in cands]
    return float(cands[int(np.argmax(f1s))])


# --------------------------------------------------------------------------- probes


@dataclass
class Probe:
    """A fitted probe: ``score(x) = sigmoid(((x - mean) / std) @ weight + bias)``."""

    sites: list[str]
    weight: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray
    threshold: float
    align: str
    metrics: dict = field(default_factory=dict)
    class_gap: float = 0.0   # |mean x of positives - mean x of negatives| on training tokens
    identity: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "+".join(self.sites)

    def score(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Memorization probability for features ``x`` [..., d] (numpy or torch)."""
        if isinstance(x, torch.Tensor):
            p = {k: torch.as_tensor(v, dtype=x.dtype, device=x.device) for k, v in
                 (("w", self.weight), ("m", self.mean), ("s", self.std))}
            return torch.sigmoid(((x - p["m"]) / p["s"]) @ p["w"] + self.bias)
        return 1 / (1 + np.exp(-(((x - self.mean) / self.std) @ self.weight + self.bias)))

    def direction(self) -> np.ndarray:
        """Unit vector in activation space along which the memorization logit grows."""
        if len(self.sites) != 1 or self.sites[0] == CONFIDENCE:
            raise ConfigError(f"probe {self.name!r} does not read one site's activations; "
                             "a direction exists for single-site probes only")
        v = self.weight / self.std
        return (v / np.linalg.norm(v)).astype(np.float32)

    def save(self, out_dir: str | Path) -> Path:
        """``probe.safetensors`` (weight, mean, std) + ``probe.json`` (everything else)."""
        out = Path(out_dir)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), np.float32))
                   for k in ("weight", "mean", "std")}
        meta = {k: v for k, v in asdict(self).items()
                if k not in ("weight", "mean", "std", "identity")}
        with atomic_dir(out) as tmp:
            save_file(tensors, tmp / "probe.safetensors")
            write_artifact(tmp, "probe.json", {**meta, "tensors_hash": state_hash(tensors)},
                           self.identity)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        meta, _ = read_artifact(path, "probe.json", "probe", "memlens probe train")
        try:
            tensors = load_file(path / "probe.safetensors")
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path / 'probe.safetensors'} cannot be read ({exc}); train the "
                            "probe again") from None
        if state_hash(tensors) != meta.pop("tensors_hash", None):
            raise DataError(f"{path / 'probe.safetensors'} does not match its checksum "
                            "(corrupted or edited); train the probe again")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(meta) - known)
        if extra:
            raise DataError(f"{path / 'probe.json'} has keys a probe does not have: {extra}; "
                            "it was edited or written by another program")
        probe = cls(**meta, **{k: v.numpy() for k, v in tensors.items()})
        numbers = [probe.bias, probe.threshold, *probe.weight, *probe.mean, *probe.std]
        if not np.isfinite(numbers).all() or probe.weight.shape != probe.mean.shape:
            raise DataError(f"{path} holds a probe with non-finite or mismatched numbers; "
                            "train the probe again")
        return probe

    def check_model(self, handle, where: str = "the probe") -> None:
        """Refuse a model other than the one whose activations the probe was trained on."""
        Identity.from_json(self.identity, where).check_model(handle, where)


def fit_probe(site: str, x: np.ndarray, y: np.ndarray, config: ProbeConfig | None = None,
              identity: Identity | None = None) -> Probe:
    """One class-balanced logistic probe on activations ``x`` [n, d] with labels ``y`` [n]
    (scikit-learn; threshold: best F1 on the same tokens)."""
    config = config or ProbeConfig()
    mean, std = _standardize(x)
    w, b = fit_sklearn((x - mean) / std, y, config)
    probe = Probe([site], w, b, mean, std, 0.5, config.align, class_gap=_class_gap(x, y),
                  identity=identity.to_json() if identity else {})
    probe.threshold = _best_threshold(y, probe.score(x))
    return probe


def _class_gap(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x[y == 1].mean(0) - x[y == 0].mean(0)))


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
    tasks = {name: (data.combined(sites), y) for name, sites in named.items()}
    if control:
        yc = control_labels(tok["token_id"].to_numpy(), y[tr].mean(), cfg.seed)
        tasks |= {f"control:{name}": (data.combined(sites), yc)
                  for name, sites in named.items()}
    identity = {}
    if data.identity is not None:
        identity = Identity(**{**data.identity.to_json(), "kind": "probe",
                               "config": asdict(cfg), "inputs": data.inputs}).to_json()
    rows, probes, scores = [], {}, {}
    for trainer in trainers:
        t0 = time.perf_counter()
        fitted = _fit_all(tasks, tr, va, cfg, trainer, progress)
        seconds = time.perf_counter() - t0
        for name, (x, yy) in tasks.items():
            w, b, mean, std = fitted[name]
            sites = named.get(name, [name.removeprefix("control:")])
            probe = Probe(sites, w, b, mean, std, 0.0, cfg.align,
                          class_gap=_class_gap(x[tr], yy[tr]), identity=identity)
            probe.threshold = _best_threshold(yy[va], probe.score(x[va]))
            s = probe.score(x[te])
            m = score_metrics(yy[te], s, groups[te], probe.threshold, cfg.n_bootstrap,
                              cfg.seed)
            m["matched_auroc"] = matched_auroc(yy[te], s, confidence[te])
            probe.metrics = m
            layer, kind = _site_layer(sites[0]) if len(sites) == 1 else (-1, "combined")
            rows.append({"probe": name, "trainer": trainer, "layer": layer, "kind": kind,
                         "control": name.startswith("control:"), "n_features": x.shape[1],
                         "fit_seconds_all": seconds, **m})
            if trainer == trainers[0] and not name.startswith("control:"):
                probes[name] = probe
                scores[name] = s
    results = pd.DataFrame(rows)
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


def _fit_all(tasks, tr, va, cfg, trainer, progress):
    prepared = {}
    for name, (x, y) in tasks.items():
        mean, std = _standardize(x[tr])
        prepared[name] = ((x[tr] - mean) / std, y[tr], (x[va] - mean) / std, y[va], mean, std)
    if trainer == "sklearn":
        out = {}
        for name, (xt, yt, _, _, mean, std) in progress_bar(prepared.items(), disable=not progress,
                                                            desc="sklearn probes"):
            w, b = fit_sklearn(xt, yt, cfg)
            out[name] = (w, b, mean, std)
        return out
    if trainer != "torch":
        raise ConfigError(f"trainer {trainer!r}: choose 'torch' or 'sklearn'")
    out = {}
    # Tasks with the same labels and width are one batched problem.
    groups: dict[tuple, list[str]] = {}
    for name, p in prepared.items():
        groups.setdefault((p[1].tobytes(), p[0].shape[1]), []).append(name)
    for names in groups.values():
        ps = [prepared[n] for n in names]
        fits = fit_torch([p[0] for p in ps], ps[0][1], [p[2] for p in ps], ps[0][3], cfg,
                         device=cfg.device)
        for n, p, (w, b) in zip(names, ps, fits, strict=True):
            out[n] = (w, b, p[4], p[5])
    return out


def matched_auroc(y: np.ndarray, score: np.ndarray, confidence: np.ndarray,
                  bins: int = 8) -> float:
    """AUROC among tokens the model is equally confident about: tokens fall into cells of
    ``bins`` quantiles of each confidence column (max log-prob, entropy); the AUROC within
    each cell holding both classes is averaged, weighted by its positive x negative pairs.
    A score that is the model's confidence in disguise gets about 0.5 here.

    Example:
        >>> matched_auroc(y, probe.score(x), tokens[["max_logprob", "entropy"]].to_numpy())
    """
    cell = np.zeros(len(y), dtype=np.int64)
    for col in np.asarray(confidence, dtype=np.float64).T:
        edges = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1)[1:-1]))
        cell = cell * (bins + 1) + np.searchsorted(edges, col, side="right")
    total = weight = 0.0
    for c in np.unique(cell):
        yc = y[cell == c]
        pairs = float(yc.sum()) * float(len(yc) - yc.sum())
        if pairs:
            total += pairs * roc_auc_score(yc, score[cell == c])
            weight += pairs
    return total / weight if weight else float("nan")


def token_baselines(test_tokens: pd.DataFrame) -> dict:
    """AUROC of the model's own confidence on the same held-out tokens."""
    y = test_tokens["y"].to_numpy()
    return {f"token_{k}": float(roc_auc_score(y, v)) for k, v in (
        ("logprob", test_tokens["logprob"]), ("max_logprob", test_tokens["max_logprob"]),
        ("neg_entropy", -test_tokens["entropy"]))}


def sequence_aurocs(token_scores: pd.DataFrame, sequences: pd.DataFrame,
                    probe_names: list[str]) -> dict:
    """Per test sequence: mean probe score vs loss, Min-K% and zlib, by AUROC.

    Targets: ``memorized`` (exactly extractable) and ``member``.
    """
    seqs = sequences.assign(id=sequences["id"].astype(str)).set_index("id")
    agg = token_scores.groupby("id")[probe_names].mean()
    seqs = seqs.loc[agg.index]
    out = {}
    for target in ("exact", "member"):
        t = seqs[target].astype(int).to_numpy()
        if t.min() == t.max():
            continue
        name = "memorized" if target == "exact" else "member"
        out[f"sequence_{name}"] = {
            "n_sequences": int(len(t)), "n_positive": int(t.sum()),
            "baselines": {"loss": float(roc_auc_score(t, -seqs["loss"])),
                          "min_k": float(roc_auc_score(t, seqs["min_k"])),
                          "zlib": float(roc_auc_score(t, -seqs["zlib"]))},
            "probes": {p: float(roc_auc_score(t, agg[p])) for p in probe_names}}
    return out
