"""How well a probe's scores separate memorized tokens: AUROC, F1, TPR at 1% FPR with
bootstrap intervals over sequences; the confidence-matched AUROC; the model's own
confidence and the sequence-level membership scores as baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from memlens.data.labels import membership_scores

__all__ = ["auroc_or_nan", "best_threshold", "class_gap", "confidence_gain", "group_draws",
           "matched_auroc", "score_metrics", "sequence_aurocs", "token_baselines", "tpr_at_fpr"]

def tpr_at_fpr(y: np.ndarray, score: np.ndarray, fpr_max: float = 0.01) -> float:
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.interp(fpr_max, fpr, tpr))


def point_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    pred = score >= threshold
    tp = float((pred & (y == 1)).sum())
    f1 = 2 * tp / max(pred.sum() + y.sum(), 1)
    return {"auroc": float(roc_auc_score(y, score)), "accuracy": float((pred == y).mean()),
            "f1": float(f1), "tpr_at_1pct_fpr": tpr_at_fpr(y, score)}


def group_draws(y: np.ndarray, groups: np.ndarray, n: int, seed: int):
    """Bootstrap resamples of whole sequences: ``n`` draws of token indices (sequences
    drawn with replacement), those holding both classes."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    for _ in range(n):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if 0 < y[idx].sum() < len(idx):
            yield idx


def score_metrics(y, score, groups, threshold: float, n_bootstrap: int, seed: int) -> dict:
    """AUROC, accuracy, F1 and TPR at 1% FPR, each with a 95% interval from resampling
    whole sequences (``n_bootstrap`` times)."""
    point = point_metrics(y, score, threshold)
    if n_bootstrap <= 0:
        return point | {f"{k}_ci_{e}": float("nan") for k in point for e in ("low", "high")}
    draws = [point_metrics(y[idx], score[idx], threshold)
             for idx in group_draws(y, groups, n_bootstrap, seed)]
    out = dict(point)
    for k in point:
        vals = [d[k] for d in draws]
        out[f"{k}_ci_low"] = float(np.percentile(vals, 2.5))
        out[f"{k}_ci_high"] = float(np.percentile(vals, 97.5))
    return out


def auroc_or_nan(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def best_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold with the best F1 on validation tokens."""
    cands = np.unique(np.quantile(score, np.linspace(0.01, 0.99, 99)))
    f1s = [f1_score(y, score >= c) for c in cands]
    return float(cands[int(np.argmax(f1s))])



def class_gap(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x[y == 1].mean(0) - x[y == 0].mean(0)))



def matched_auroc(y: np.ndarray, score: np.ndarray, confidence: np.ndarray,
                  caliper: float = 0.2, k: int = 5) -> tuple[float, float]:
    """AUROC among tokens the model is equally confident about, and its coverage: the share
    of positive tokens that found a match.

    Propensity matching on the confidence columns (max log-prob, entropy): a logistic
    regression of ``y`` on them gives each token's propensity (the design stage; ``score``
    plays no part); each positive is compared with its ``k`` nearest negatives in logit
    propensity (with replacement) that lie within ``caliper`` standard deviations of it
    (Austin 2011's 0.2), and the share of those it outscores is averaged over the positives
    matched. A score that is the model's confidence in disguise gets about 0.5 here;
    positives no negative is as confident as go unmatched, and the coverage says how many.

    Example:
        >>> auroc, coverage = matched_auroc(y, probe.score(x),
        ...                                 tokens[["max_logprob", "entropy"]].to_numpy())
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    if not 0 < y.sum() < len(y):
        return float("nan"), float("nan")
    x = StandardScaler().fit_transform(np.asarray(confidence, dtype=np.float64))
    logit = LogisticRegression(C=1e4, max_iter=1000).fit(x, y).decision_function(x)
    neg = np.flatnonzero(y == 0)
    neg = neg[np.argsort(logit[neg], kind="stable")]
    pos = np.flatnonzero(y == 1)
    # The k nearest negatives lie among the k on either side of the insertion point.
    at = np.searchsorted(logit[neg], logit[pos])
    cand = at[:, None] + np.arange(-k, k)[None, :]
    inside = (cand >= 0) & (cand < len(neg))
    cand = np.clip(cand, 0, len(neg) - 1)
    dist = np.where(inside, np.abs(logit[neg][cand] - logit[pos][:, None]), np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    near, dist = (np.take_along_axis(a, order, axis=1) for a in (cand, dist))
    ok = dist <= caliper * logit.std()
    s_pos, s_neg = score[pos][:, None], score[neg][near]
    wins = ((s_pos > s_neg) + 0.5 * (s_pos == s_neg)) * ok
    matched = ok.any(axis=1)
    if not matched.any():
        return float("nan"), 0.0
    per_positive = wins[matched].sum(1) / ok[matched].sum(1)
    return float(per_positive.mean()), float(matched.mean())


def confidence_gain(y: np.ndarray, score: np.ndarray, confidence_score: np.ndarray,
                    groups: np.ndarray, n_bootstrap: int = 200, seed: int = 0
                    ) -> tuple[float, float, float]:
    """A probe's AUROC minus the confidence probe's on the same tokens, with a 95% interval
    from resampling whole sequences (paired: both scores see the same draw)."""
    y = np.asarray(y)
    point = auroc_or_nan(y, score) - auroc_or_nan(y, confidence_score)
    draws = [roc_auc_score(y[idx], score[idx]) - roc_auc_score(y[idx], confidence_score[idx])
             for idx in group_draws(y, groups, n_bootstrap, seed)]
    if not draws:
        return point, float("nan"), float("nan")
    return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def token_baselines(test_tokens: pd.DataFrame) -> dict:
    """AUROC of the model's own confidence on the same held-out tokens."""
    y = test_tokens["y"].to_numpy()
    return {f"token_{k}": float(roc_auc_score(y, v)) for k, v in (
        ("logprob", test_tokens["logprob"]), ("max_logprob", test_tokens["max_logprob"]),
        ("neg_entropy", -test_tokens["entropy"]))}


def sequence_aurocs(token_scores: pd.DataFrame, sequences: pd.DataFrame,
                    probe_names: list[str]) -> dict:
    """Per test sequence: mean probe score vs the membership scores (loss, Min-K%, Min-K%++,
    zlib), by AUROC.

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
            "baselines": {k: float(roc_auc_score(t, v))
                          for k, v in membership_scores(seqs).items()},
            "probes": {p: float(roc_auc_score(t, agg[p])) for p in probe_names}}
    return out
