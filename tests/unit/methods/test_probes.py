"""Probe fitting and metrics on synthetic features."""

import numpy as np
import pandas as pd
import pytest

from memlens.methods.probes import (
    ProbeConfig,
    confidence_gain,
    control_labels,
    fit_sklearn,
    fit_torch,
    matched_auroc,
    split_sequences,
)


def test_torch_and_sklearn_fit_the_same_logistic_regression():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 20)).astype(np.float32)
    w_true = rng.normal(size=20)
    y = (x @ w_true + rng.normal(size=3000) > 1.0).astype(np.int64)
    cfg = ProbeConfig(l2=1e-2, max_iter=50, patience=5)
    w_sk, b_sk = fit_sklearn(x[:2000], y[:2000], cfg)
    (w_t, b_t), = fit_torch([x[:2000]], y[:2000], [x[2000:]], y[2000:], cfg)
    np.testing.assert_allclose(w_t, w_sk, atol=2e-3)
    assert b_t == pytest.approx(b_sk, abs=2e-3)


def test_split_and_control_helpers():
    dup = pd.Series({f"s{i}": [0, 1, 100][i % 3] for i in range(60)})
    split = split_sequences(dup, (0.6, 0.2, 0.2), seed=0)
    assert split.value_counts().to_dict() == {"train": 36, "val": 12, "test": 12}
    for d in (0, 1, 100):
        assert split[dup[dup == d].index].value_counts().to_dict() == {
            "train": 12, "val": 4, "test": 4}
    ids = np.arange(5000)
    c = control_labels(ids, 0.2, seed=3)
    assert abs(c.mean() - 0.2) < 0.03
    assert (control_labels(ids, 0.2, seed=3) == c).all()
    assert (control_labels(np.array([7, 7, 7]), 0.2, seed=3) == c[7]).all()
    with pytest.raises(ValueError, match="both positive and negative"):
        ProbeConfig(positive=("memorized",), negative=("memorized",))


def test_matched_auroc_sees_through_a_score_that_is_only_confidence():
    rng = np.random.default_rng(0)
    confidence = rng.normal(size=(6000, 2))
    y = (confidence[:, 0] + rng.normal(0, 0.5, 6000) > 0.8).astype(int)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, confidence[:, 0]) > 0.9
    auroc, coverage = matched_auroc(y, confidence[:, 0], confidence)
    assert 0.45 < auroc < 0.6 and coverage > 0.9
    # A score carrying signal beyond confidence keeps it among matched tokens.
    own = y + rng.normal(0, 0.6, 6000)
    assert abs(matched_auroc(y, own, confidence)[0] - roc_auc_score(y, own)) < 0.05
    # Positives more confident than every negative have no match within the caliper (0.2 SD
    # of the logit propensity; 9.0 is 1 SD from 5.0): they are dropped, and the coverage
    # says so. The two kept positives are compared with the three negatives within reach
    # (0, .1, .2; 5.0 is too far): 1.5 beats two of them, 2.5 all three.
    c = np.array([[0.0], [0.1], [0.2], [5.0], [0.15], [0.05], [9.0], [9.1]])
    auroc, coverage = matched_auroc(np.array([0, 0, 0, 0, 1, 1, 1, 1]),
                                    np.array([0, 1, 2, 3, 1.5, 2.5, 0, 0]), c)
    assert coverage == 0.5
    assert auroc == pytest.approx((2 / 3 + 1) / 2)
    assert np.isnan(matched_auroc(np.zeros(4, int), np.arange(4.0), np.ones((4, 2)))[0])


def test_confidence_gain_is_paired_over_sequences():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    conf = y + rng.normal(0, 1.0, 400)
    groups = np.repeat(np.arange(40), 10)
    point, low, high = confidence_gain(y, conf, conf, groups, n_bootstrap=50)
    assert point == low == high == 0
    better = y + rng.normal(0, 0.3, 400)
    point, low, high = confidence_gain(y, better, conf, groups, n_bootstrap=200)
    from sklearn.metrics import roc_auc_score

    assert point == pytest.approx(roc_auc_score(y, better) - roc_auc_score(y, conf))
    assert 0 < low < point < high
