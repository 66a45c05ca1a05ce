"""The core: the rule for unknown duplication, artifact identity, input validation, and"""

import math

import numpy as np
import pytest

from memlens.core.errors import DataError
from memlens.core.metrics import auroc_ci, by_duplication, counts_by_duplication, n_for_p
from memlens.core.sequences import Sequence


def test_unknown_duplication_is_its_own_key_everywhere():
    assert by_duplication([100, None, 0, 5, None], [1, 0, 0, 1, 1]) == {
        "0": 0.0, "5": 1.0, "100": 1.0, "unknown": 0.5}
    assert list(counts_by_duplication([None, 10, 1, 10])) == ["1", "10", "unknown"]
    assert Sequence("a", [1, 2], duplication=None).member
    assert not Sequence("b", [1, 2], duplication=0).member


def test_n_for_p():
    assert n_for_p(math.log(0.95), 0.9) == 1
    assert n_for_p(math.log(0.5), 0.9) == 4  # 1 - 0.5^4 = 0.9375 >= 0.9 > 0.875
    assert n_for_p(-math.inf, 0.9) == math.inf


def test_auroc_interval_resamples_each_class_and_holds_the_point():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = [1] * 20 + [0] * 60
    score = np.r_[rng.normal(1, 1, 20), rng.normal(0, 1, 60)]
    lo, hi = auroc_ci(y, score.tolist())
    assert lo < roc_auc_score(y, score) < hi and hi - lo < 0.35
    # Every positive above every negative: every draw is 1; ties count half.
    assert auroc_ci([1, 1, 0, 0], [3, 4, 1, 2]) == (1.0, 1.0)
    assert auroc_ci([1, 0], [5, 5]) == (0.5, 0.5)
    with pytest.raises(DataError, match="positives and negatives"):
        auroc_ci([1, 1], [1, 2])
