import json
import re

from memlens.core.jsonio import plain
from memlens.core.metrics import Extraction
from memlens.steps.demo import STEPS, DemoConfig, run_demo


def test_demo_summary_holds_every_step(tiny_demo):
    out, summary = tiny_demo
    written = json.loads((out / "summary.json").read_text())
    assert set(STEPS) | {"seconds"} <= set(written)
    assert {k: written[k] for k in STEPS} == plain({k: summary[k] for k in STEPS})
    recited = Extraction.from_json(summary["labels"]).exact
    assert recited["100"] >= 0.9 and recited["0"] == 0.0
    assert summary["probes"]["auroc"] > 0.8
    for step in ("kfac", "interventions", "steering"):
        r = summary[step]
        assert r["exact_100x_before"] == Extraction.from_json(
            summary["labels"]["before"]).exact["100"] >= 0.9
        assert r["perplexity_after"] != r["perplexity_before"]  # the edit took effect
    # Steering that added the vector would leave the held-out 100x canaries recited
    # (measured: 1.0 -> 0.4 at +19% on the tiny organism). The demo's K-FAC budget (.003)
    # removes nothing on the tiny organism; the aimed edit's selection is tested in
    # test_curvature, and its held-out effect on the small organism by test_readme
    # (100% -> 0% at +0.9%), which a sign-flipped edit fails.
    steering = summary["steering"]
    assert steering["exact_100x_after"] <= 0.6 < steering["exact_100x_before"]
    assert steering["perplexity_change"] > 0
    assert summary["interventions"]["perplexity_change"] > 0
    assert len(summary["layernorm"]["grad_ratio_by_module"]) == 4  # 2 blocks x 2 norms
    audit = summary["audit"]
    assert set(audit) == {"unedited", "retrain without", "K-FAC edit", "neuron ablation",
                          "probe-gated steering"}
    assert audit["unedited"]["exact"] >= 0.8 and audit["retrain without"]["exact"] == 0
    assert audit["retrain without"]["mia_auroc_loss"] < 0.8 < audit["unedited"]["mia_auroc_loss"]
    assert audit["K-FAC edit"]["exact"] == summary["kfac"]["exact_100x_after"]


def strict_json(text: str):
    """Parse as standard JSON does (JavaScript's JSON.parse, jq): NaN and Infinity refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_artifact_is_strict_json_and_no_lock_file_is_left(tiny_demo):
    out, summary = tiny_demo
    files = sorted(out.rglob("*.json"))
    assert len(files) >= 15 and out / "summary.json" in files
    for f in files:
        strict_json(f.read_text())  # raises on NaN / -Infinity
    # p_z = 0 (a suffix top-k sampling cannot produce) for some non-members: their median
    # log p_z is finite or null, never -Infinity, and the share of such sequences is there.
    labels = strict_json((out / "labels" / "summary.json").read_text())
    assert set(labels["median_log_p_z_by_duplication"]) == set(labels["n_by_duplication"])
    assert 0 < labels["p_z_zero_share_by_duplication"]["0"] <= 1
    assert labels["p_z_zero_share_by_duplication"]["100"] == 0
    assert labels["median_log_p_z_by_duplication"]["100"] > -5
    assert Extraction.from_json(summary["labels"]).exact["100"] >= 0.9
    litter = [p.name for p in out.rglob(".*")]
    assert litter == [], litter


def test_demo_second_run_reuses_every_step(tiny_demo, capsys):
    out, first = tiny_demo
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()}
    again = run_demo(out, config=DemoConfig(preset="tiny"), progress=False)
    printed = capsys.readouterr().out
    assert printed.count(": cached") == len(STEPS)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()} == stamps
    assert plain({k: again[k] for k in STEPS}) == plain({k: first[k] for k in STEPS})


def test_report_renders_offline_in_headless_chromium(tiny_demo, render):
    out, _ = tiny_demo
    page = (out / "report.html").read_text()
    # Offline: plotly.js is inline (megabytes of it) and nothing is fetched.
    assert re.search(r"<(script|link)[^>]+(src|href)=", page) is None and len(page) > 3e6
    dom, console = render(out / "report.html")
    assert console == [], console
    n_figures = page.count('class="plotly-graph-div"')
    assert n_figures >= 8
    # Each figure Plotly draws gets its own SVG root; none is left empty.
    assert dom.count('class="main-svg"') >= n_figures
    assert dom.count('class="plotly-graph-div') == n_figures
    assert "token-view" in dom and dom.count("class=\"tok\"") > 100


