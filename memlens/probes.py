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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
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
    chunk_mb: int = 512  # features the torch trainer holds at once (it streams the rest)

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


class SiteFeatures(Mapping):
    """Features per site at the labeled tokens, read from the store when asked for: nothing
    is held in memory. ``features[site]`` loads one site's rows; :meth:`rows` any subset."""

    def __init__(self, store: ActivationStore, sites: list[str], store_rows: np.ndarray,
                 confidence: np.ndarray):
        self.store, self.sites = store, list(sites)
        self.store_rows, self.confidence = store_rows, confidence

    def __getitem__(self, site: str) -> np.ndarray:
        return self.rows(site, np.arange(len(self.store_rows))).astype(np.float32, copy=False)

    def __iter__(self):
        return iter([*self.sites, CONFIDENCE])

    def __len__(self) -> int:
        return len(self.sites) + 1

    def rows(self, site: str, index: np.ndarray) -> np.ndarray:
        """[len(index), d]: the features of tokens ``index`` (rows of the tokens table) at
        ``site``, float32 or float16 as stored (bfloat16 becomes float32)."""
        if site == CONFIDENCE:
            return self.confidence[index]
        if site not in self.sites:
            raise KeyError(site)
        x = self.store.rows(site, self.store_rows[index], dtype=None)
        x = x.float() if x.dtype == torch.bfloat16 else x
        return x.numpy().reshape(len(index), -1)


@dataclass
class ProbeData:
    """Features per site, aligned with one row per labeled token (read from the store on
    demand, so a store larger than memory works)."""

    tokens: pd.DataFrame                  # id, position, label, y, split, duplication, ...
    features: Mapping[str, np.ndarray]    # site -> [n_tokens, d] (float32), loaded per access
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
        # In store order, so that a run of tokens is a run of rows in one shard.
        tok = tok.sort_values("row", kind="stable").reset_index(drop=True)
        for site in sites or []:
            store.shards(site)  # an unknown site fails here, naming the store's sites
        features = SiteFeatures(store, sites or store.sites, tok["row"].to_numpy(),
                                tok[["max_logprob", "entropy"]].to_numpy(np.float32))
        return cls(tok, features, config, store.identity,
                   {k: v.digest for k, v in inputs.items()})

    def combined(self, sites: list[str], index: np.ndarray | None = None) -> np.ndarray:
        """[tokens, sum of d]: the sites' features side by side (at tokens ``index``)."""
        index = np.arange(len(self.tokens)) if index is None else index
        read = getattr(self.features, "rows", lambda s, i: np.asarray(self.features[s])[i])
        return np.concatenate([read(s, index) for s in sites], axis=1)

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


@dataclass
class RowChunks:
    """Standardized features of several probes at ``n`` tokens, produced in chunks of rows:
    each chunk is [probes, rows, d + 1] (a ones column carries the bias). The torch
    trainer's input; it holds one chunk at a time.

    ``read(start, stop)`` gives the raw features of tokens ``start:stop``, one [rows, d]
    array per probe.
    """

    read: Callable[[int, int], list[np.ndarray]]
    n: int
    mean: np.ndarray    # [probes, d]
    std: np.ndarray     # [probes, d]
    chunk_rows: int
    device: str = "cpu"

    @classmethod
    def of_arrays(cls, xs: list[np.ndarray], device: str = "cpu") -> RowChunks:
        """Already standardized arrays in memory, as one chunk."""
        d = xs[0].shape[1]
        return cls(lambda a, b: [x[a:b] for x in xs], len(xs[0]), np.zeros((len(xs), d)),
                   np.ones((len(xs), d)), max(len(xs[0]), 1), device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Chunks in row order. Each is a view of one buffer that the next overwrites
        (fewer large allocations: the allocator would otherwise keep growing)."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=self.device)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=self.device)
        buffer = None
        for start in range(0, self.n, self.chunk_rows):
            raw = self.read(start, min(start + self.chunk_rows, self.n))
            if buffer is None:
                buffer = torch.ones(len(raw), min(self.chunk_rows, self.n), mean.shape[1] + 1,
                                    device=self.device)
            x = buffer[:, :len(raw[0])]
            for i, m in enumerate(raw):
                x[i, :, :-1].copy_(torch.from_numpy(np.asarray(m))).sub_(mean[i]).div_(std[i])
            del raw
            _trim_heap()
            yield x

    def dot(self, W: torch.Tensor) -> torch.Tensor:
        """``X @ W`` per probe: [probes, n]."""
        return torch.cat([torch.bmm(x, W[:, :, None])[..., 0] for x in self], dim=1)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): reading a store
    chunk by chunk frees as much as it allocates, yet without this the process's memory
    grows with the number of chunks."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def fit_torch(xs: list[np.ndarray], y: np.ndarray, x_vals: list[np.ndarray], y_val: np.ndarray,
              config: ProbeConfig, device: str = "cpu", newton_max_d: int = 1024
              ) -> list[tuple[np.ndarray, float]]:
    """Fit one probe per (standardized) feature matrix at once, as one batched problem;
    every matrix must have the same width. See :func:`fit_chunks`."""
    d = xs[0].shape[1]
    if any(x.shape[1] != d for x in xs):
        raise ValueError("fit_torch batches probes of one width; group them by width")
    ys, yvs = np.repeat(y[None], len(xs), 0), np.repeat(y_val[None], len(xs), 0)
    return fit_chunks(RowChunks.of_arrays(xs, device), ys, RowChunks.of_arrays(x_vals, device),
                      yvs, config, newton_max_d)


def fit_chunks(train: RowChunks, y: np.ndarray, val: RowChunks, y_val: np.ndarray,
               config: ProbeConfig, newton_max_d: int = 1024) -> list[tuple[np.ndarray, float]]:
    """Fit a probe per row of ``y`` [probes, n] (each its own labels) on ``train``'s chunks.

    Widths up to ``newton_max_d`` use batched Newton steps (IRLS: each step two passes over
    the chunks and one [probes, d, d] solve); wider ones L-BFGS. Early stopping: each probe
    keeps the weights of its best validation loss, and fitting stops once none has improved
    (by 1e-4 relative) for ``patience`` steps. Only chunks and per-token numbers are held,
    so the features can be larger than memory.
    """
    device = train.device
    n_probes, d = train.mean.shape
    Y = torch.as_tensor(np.asarray(y), dtype=torch.float32, device=device)
    Yv = torch.as_tensor(np.asarray(y_val), dtype=torch.float32, device=device)
    sw = torch.as_tensor(np.stack([_class_weights(r) / len(r) for r in np.asarray(y)]),
                         dtype=torch.float32, device=device)
    swv = torch.as_tensor(np.stack([_class_weights(r) / len(r) for r in np.asarray(y_val)]),
                          dtype=torch.float32, device=device)
    reg = torch.full((d + 1,), config.l2, device=device)
    reg[-1] = 0.0  # no penalty on the bias
    W = torch.zeros(n_probes, d + 1, device=device)
    best = torch.full((n_probes,), float("inf"), device=device)
    best_W = W.clone()
    stale = 0
    z = torch.zeros(n_probes, train.n, device=device)
    zv = torch.zeros(n_probes, val.n, device=device)
    if d <= newton_max_d:
        steps = config.max_iter

        def step_fn():
            nonlocal z, zv
            W_new, z, converged, step, scale = _newton_step(train, Y, sw, reg, W, z)
            zv = zv - scale * val.dot(step)  # validation logits move linearly too
            return W_new, converged
    else:
        Wp = W.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([Wp], lr=1, max_iter=5, history_size=20,
                                line_search_fn="strong_wolfe")
        steps = max(1, config.max_iter // 5)

        def closure():
            opt.zero_grad()
            f = (0.5 * (reg * Wp ** 2).sum(1)).sum()
            f.backward()
            total, start = f.detach(), 0
            for x in train:  # the loss summed chunk by chunk, gradients accumulated
                rows = slice(start, start + x.shape[1])
                part = _weighted_bce(torch.bmm(x, Wp[:, :, None])[..., 0], Y[:, rows],
                                     sw[:, rows]).sum()
                part.backward()
                total, start = total + part.detach(), start + x.shape[1]
            return total

        def step_fn():
            nonlocal zv
            opt.step(closure)
            zv = val.dot(Wp.detach())
            return Wp.detach().clone(), False

    for _ in range(steps):
        W, converged = step_fn()
        with torch.no_grad():
            val_loss = _weighted_bce(zv, Yv, swv)
            better = val_loss < best * (1 - 1e-4)
            best = torch.where(better, val_loss, best)
            best_W[better] = W[better]
        stale = 0 if better.any() else stale + 1
        if stale >= config.patience or converged:
            break
    return [(best_W[i, :d].cpu().numpy(), float(best_W[i, d])) for i in range(n_probes)]


def _weighted_bce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-probe weighted log-loss of logits ``z`` [probes, n]."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        z, y.expand_as(z), reduction="none")
    return (bce * w).sum(1)


@torch.no_grad()
def _newton_step(X: RowChunks, Y, sw, reg, W, z):
    """One damped Newton step per probe (halved where it would raise the objective).

    Takes and returns the logits ``z = X @ W``, so that each step reads X twice: gradient
    with curvature, then the logits' change. Returns the new weights and logits, whether
    every probe had converged before the step, the step and its scale per probe.
    """
    def objective(z, W):
        return _weighted_bce(z, Y, sw) + 0.5 * (reg * W ** 2).sum(1)

    p = torch.sigmoid(z)
    resid = sw * (p - Y)
    curv = sw * p * (1 - p)
    # Subsampled Newton: the curvature from every stride-th row (rescaled); the gradient
    # stays exact, so the optimum is the same and each step costs far less.
    stride = max(1, X.n // max(2048, 4 * W.shape[1]))
    rescale = curv.sum(1, keepdim=True) / curv[:, ::stride].sum(1, keepdim=True)
    grad = reg * W
    hess = torch.diag_embed((reg + 1e-8).expand_as(W)).clone()
    start = 0
    for x in X:
        rows = slice(start, start + x.shape[1])
        grad += torch.bmm(x.transpose(1, 2), resid[:, rows, None])[..., 0]
        first = -start % stride  # the rows of this chunk on the global stride
        xh = x[:, first::stride]
        ch = curv[:, start + first:start + x.shape[1]:stride] * rescale
        hess += torch.bmm(xh.transpose(1, 2), xh * ch[..., None])
        start += x.shape[1]
    step = torch.linalg.solve(hess, grad)
    # Newton decrement: half of it bounds the remaining drop of the objective.
    converged = bool(((grad * step).sum(1) < 1e-6).all())
    before = objective(z, W)
    dz = X.dot(step)  # logits move linearly with the step
    scale = torch.ones(len(W), 1, device=W.device)
    for _ in range(8):
        worse = objective(z - scale * dz, W - scale * step) > before + 1e-12
        if not worse.any():
            break
        scale[worse] *= 0.5
    return W - scale * step, z - scale * dz, converged, step, scale


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


def _auroc_or_nan(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


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
    tasks = {name: (sites, y) for name, sites in named.items()}
    if control:
        yc = control_labels(tok["token_id"].to_numpy(), y[tr].mean(), cfg.seed)
        tasks |= {f"control:{name}": (sites, yc) for name, sites in named.items()}
    identity = {}
    if data.identity is not None:
        identity = Identity(**{**data.identity.to_json(), "kind": "probe",
                               "config": asdict(cfg), "inputs": data.inputs}).to_json()
    rows, probes, scores = [], {}, {}
    index = {k: np.flatnonzero(m) for k, m in (("train", tr), ("val", va), ("test", te))}
    for trainer in trainers:
        t0 = time.perf_counter()
        fitted = fit_probes(data, tasks, index, trainer, progress)
        seconds = time.perf_counter() - t0
        for name, (sites, yy) in tasks.items():
            f = fitted[name]
            probe = Probe(sites, f.weight, f.bias, f.mean, f.std, 0.0, cfg.align,
                          class_gap=f.class_gap, identity=identity)
            probe.threshold = _best_threshold(yy[va], f.val_score)
            s = f.test_score
            m = score_metrics(yy[te], s, groups[te], probe.threshold, cfg.n_bootstrap,
                              cfg.seed)
            m["matched_auroc"] = matched_auroc(yy[te], s, confidence[te])
            m["val_auroc"] = _auroc_or_nan(yy[va], f.val_score)
            probe.metrics = m
            layer, kind = _site_layer(sites[0]) if len(sites) == 1 else (-1, "combined")
            rows.append({"probe": name, "trainer": trainer, "layer": layer, "kind": kind,
                         "control": name.startswith("control:"), "n_features": len(f.mean),
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
            mean, std = _standardize(x)
            w, b = fit_sklearn((x - mean) / std, y[index["train"]], cfg)
            score = [1 / (1 + np.exp(-(((data.combined(sites, index[k]).astype(np.float32)
                                         - mean) / std) @ w + b))) for k in ("val", "test")]
            out[name] = FittedProbe(w, b, mean, std, _class_gap(x, y[index["train"]]), *score)
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
        _trim_heap()
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
