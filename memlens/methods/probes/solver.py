"""The probe fits: scikit-learn's logistic regression (the reference) and a batched,
streaming Newton / L-BFGS solver for many probes at once on features larger than memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from memlens.methods.probes.data import ProbeConfig

__all__ = ["RowChunks", "class_weights", "fit_chunks", "fit_sklearn", "fit_torch",
           "standardize", "trim_heap"]

def standardize(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(0)
    std = x_train.std(0)
    return mean, np.where(std > 1e-6, std, 1.0)


def class_weights(y: np.ndarray) -> np.ndarray:
    n_pos = max(int(y.sum()), 1)
    n_neg = max(len(y) - n_pos, 1)
    return np.where(y == 1, len(y) / (2 * n_pos), len(y) / (2 * n_neg))


def fit_sklearn(x: np.ndarray, y: np.ndarray, config: ProbeConfig) -> tuple[np.ndarray, float]:
    """The reference fit: class-balanced L2 logistic regression (standardized x)."""
    from sklearn.linear_model import LogisticRegression

    # Same objective as fit_torch: mean weighted log-loss + l2/2 |w|^2.
    clf = LogisticRegression(C=1.0 / (config.l2 * len(y)), max_iter=2000, tol=1e-6)
    clf.fit(x, y, sample_weight=class_weights(y))
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
            trim_heap()
            yield x

    def dot(self, W: torch.Tensor) -> torch.Tensor:
        """``X @ W`` per probe: [probes, n]."""
        return torch.cat([torch.bmm(x, W[:, :, None])[..., 0] for x in self], dim=1)


def trim_heap() -> None:
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
    sw = torch.as_tensor(np.stack([class_weights(r) / len(r) for r in np.asarray(y)]),
                         dtype=torch.float32, device=device)
    swv = torch.as_tensor(np.stack([class_weights(r) / len(r) for r in np.asarray(y_val)]),
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
