"""The README's demo table is what a fresh ``memlens demo`` on the pinned releases
(constraints.txt) prints, number by number, within the tolerances the README states."""

import re
import sys
from pathlib import Path

import pytest

from memlens.steps.audit import markdown_audit_table
from memlens.steps.demo import run_demo
from memlens.steps.run import headline_rows, markdown_table

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
from readme_table import readme_table, tables  # noqa: E402

PRETRAINED = Path(__file__).parents[1] / "docs" / "results" / "pretrained.json"

NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?%?")


def tolerance(text: str) -> float:
    """Extraction rates (40 or 20 canaries) within 5 points, perplexity changes (signed)
    within 0.5 points, AUROCs, losses and VerbMem within .01, PrivLeak (signed, whole
    percent) within 5; counts and settings exactly."""
    if text.endswith("%"):
        return 0.5 if text[0] in "+-" else 5.0
    if "." in text:
        return 0.01
    return 5.0 if text[0] in "+-" else 0.0


def assert_same_table(readme: str, fresh: str) -> None:
    rows, fresh_rows = readme.splitlines(), fresh.splitlines()
    assert len(rows) == len(fresh_rows), (readme, fresh)
    for row, new in zip(rows, fresh_rows, strict=True):
        assert NUMBER.sub("#", row) == NUMBER.sub("#", new), (row, new)
        for a, b in zip(NUMBER.findall(row), NUMBER.findall(new), strict=True):
            x, y = float(a.rstrip("%")), float(b.rstrip("%"))
            assert abs(x - y) <= tolerance(a) + 1e-9, f"{a} (README) vs {b} (fresh): {new}"


def test_the_comparison_catches_a_moved_number():
    table = readme_table()
    assert table.count("\n") >= 8 and "| kfac |" in table
    assert_same_table(table, table)
    moved = table.replace("100x exact 100% -> 40%", "100x exact 100% -> 50%", 1)
    assert moved != table
    with pytest.raises(AssertionError, match="README"):
        assert_same_table(table, moved)
    with pytest.raises(AssertionError):
        assert_same_table(table, table.replace("zlib", "zlib2", 1))


def test_the_smollm2_audit_table_is_the_committed_results():
    table = readme_table(name="pretrained audit table")
    assert table == tables(None, PRETRAINED)["pretrained audit table"]
    assert table.count("\n") >= 5 and "| retrain without | reference |" in table


@pytest.mark.slow
def test_a_fresh_demo_reproduces_the_readme_tables(tmp_path):
    summary = run_demo(tmp_path / "demo", progress=False)
    assert_same_table(readme_table(), markdown_table(headline_rows(summary)))
    assert_same_table(readme_table(name="demo audit table"),
                      markdown_audit_table(summary["audit"]))
