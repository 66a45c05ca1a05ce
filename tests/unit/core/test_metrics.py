"""The core: the rule for unknown duplication, artifact identity, input validation, and"""

import math

from memlens.core.metrics import by_duplication, counts_by_duplication, n_for_p
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
