"""Choosing a setting on the calibration half: the weakest that reaches the target within
the utility budget, else the most removal within it, never one over it; and the halves
never share a record."""

from contextlib import nullcontext

import pytest

from memlens.core.metrics import bootstrap_ci
from memlens.core.sequences import Sequence
from memlens.data.splits import Splits
from memlens.steps.calibrate import choose
from memlens.steps.chain import Measure, RunConfig


class FakeChain:
    """A chain whose calibration measure is a table: setting label -> (removed, perplexity
    rise); it records which halves were measured."""

    def __init__(self, table, **config):
        self.table, self.config, self.progress = table, RunConfig(**config), False
        self.current, self.halves = None, []

    def before_perplexity(self, half):
        return 10.0

    def measure(self, half):
        self.halves.append(half)
        removed, rise = self.table[self.current]
        n = 20
        exact = [i >= round(removed * n) for i in range(n)]
        return Measure([str(i) for i in range(n)], [None] * n, exact, 10.0 * (1 + rise))

    def apply(self, params):
        self.current = params["label"]
        return nullcontext()


def families(chain, names):
    return {fam: [{"label": label} for label in labels] for fam, labels in names.items()}


def test_the_weakest_setting_that_reaches_the_target_within_the_budget_is_chosen():
    chain = FakeChain({"a1": (0.2, 0.01), "a2": (0.95, 0.03), "a3": (1.0, 0.04),
                       "b1": (0.9, 0.02), "b2": (1.0, 0.2)},
                      max_ppl_increase=0.05, target_removal=0.9)
    choice = choose(chain, families(chain, {"a": ["a1", "a2", "a3"], "b": ["b1", "b2"]}),
                    chain.apply)
    assert choice.params == {"label": "b1"} and choice.met_target
    assert choice.removed == pytest.approx(0.9) and choice.perplexity_change == pytest.approx(0.02)
    # A family stops at its first setting that reaches the target: a3 and b2 were not tried.
    assert [c["setting"] for c in choice.curve] == ["a1", "a2", "b1"]
    assert set(chain.halves) == {"calibration"}


def test_short_of_the_target_the_most_removal_within_the_budget_and_never_over_it():
    chain = FakeChain({"a1": (0.1, 0.01), "a2": (0.4, 0.04), "a3": (0.99, 0.3),
                       "b1": (0.4, 0.02), "b2": (0.5, 0.06)},
                      max_ppl_increase=0.05, target_removal=0.9)
    choice = choose(chain, families(chain, {"a": ["a1", "a2", "a3"], "b": ["b1", "b2"]}),
                    chain.apply)
    assert choice.params == {"label": "b1"} and not choice.met_target  # ties: less perplexity
    over = FakeChain({"a1": (1.0, 0.5)}, max_ppl_increase=0.05)
    nothing = choose(over, families(over, {"a": ["a1"]}), over.apply)
    assert nothing.params is None and nothing.removed is None and len(nothing.curve) == 1


def test_the_halves_split_every_record_once():
    seqs = [Sequence(str(i), [1, 2, 3], duplication=d)
            for i, d in enumerate([5, 0, 1, 100, 0, 0, 25, 10, 1])]
    splits = Splits([s for s in seqs if s.member], [s for s in seqs if not s.member], [])
    cal, ev = splits.ids("calibration"), splits.ids("evaluation")
    assert not set(cal) & set(ev) and sorted(cal + ev) == sorted(s.id for s in seqs)
    assert {s.id for s in splits.calibration} | {s.id for s in splits.evaluation} == {
        s.id for s in seqs if s.member}


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_records():
    lo, hi = bootstrap_ci([1, 0] * 5)
    assert lo < 0.5 < hi and hi - lo > 0.4
    lo2, hi2 = bootstrap_ci([1, 0] * 200)
    assert lo2 < 0.5 < hi2 and hi2 - lo2 < 0.15
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)



def test_removal_by_duplication_counts_each_count_with_its_interval():
    m = Measure(["a", "b", "c", "d", "e"], [25, 25, 10, None, 25],
                [False, True, False, False, False], 10.0)
    by = m.removed_by_duplication()
    assert list(by) == ["10", "25"]  # records of unknown count are in no row
    assert by["25"]["removed"] == pytest.approx(2 / 3) and by["25"]["n"] == 3
    assert by["10"] == {"removed": 1.0, "ci": [1.0, 1.0], "n": 1}
    assert by["25"]["ci"][0] < 2 / 3 < by["25"]["ci"][1]
