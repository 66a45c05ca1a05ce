"""`memlens run` (and the demo, which is run on an organism): every step on the calibration
/ evaluation protocol, the settings chosen and recorded, the report, the cache; and a JSONL
of bare texts, where what needs ground truth is reported as skipped."""

import json
import re

import pandas as pd
import pytest

from memlens.cli import main
from memlens.core.jsonio import plain
from memlens.core.metrics import Extraction
from memlens.data.organism import organism_path
from memlens.methods.unlearn import METHODS
from memlens.steps.audit import markdown_audit_table
from memlens.steps.demo import run_demo
from memlens.steps.run import REMOVAL_STEPS, STEPS, run


def check_protocol(out, summary):
    """The halves split the labeled records once; every chosen setting met the budget on
    the calibration half, and its evaluation numbers are over the evaluation half's recited
    records."""
    cal = summary["calibration"]
    labeled = set(pd.read_parquet(out / "labels" / "sequences.parquet")["id"].astype(str))
    assert not set(cal["calibration_ids"]) & set(cal["evaluation_ids"])
    assert set(cal["calibration_ids"]) | set(cal["evaluation_ids"]) == labeled
    halves = summary["labels"]["halves"]
    for step in REMOVAL_STEPS:
        r, chosen = summary[step], cal["chosen"][step]
        assert chosen["setting"] == r["chosen"]["params"] is not None
        assert chosen["perplexity_change_on_calibration"] <= cal["max_ppl_increase"]
        assert chosen["met_target"] == (chosen["removed_on_calibration"]
                                        >= cal["target_removal"])
        point = [c for c in r["chosen"]["curve"] if c["params"] == chosen["setting"]]
        assert point and point[0]["removed"] == chosen["removed_on_calibration"]
        assert r["aimed_at"]["n_recited"] == halves["calibration"]["recited"]
        seen = r["never_seen"]
        assert seen["n_recited"] == halves["evaluation"]["recited"] > 0
        assert seen["removed_ci"][0] <= seen["removed"] <= seen["removed_ci"][1]
        # Per count, the same records: their shares add up to the whole.
        by = seen["removed_by_duplication"]
        if by:
            assert sum(v["n"] for v in by.values()) == seen["n_recited"]
            assert sum(v["removed"] * v["n"] for v in by.values()) == pytest.approx(
                seen["removed"] * seen["n_recited"])
    # The published keep-mass edit and SVD are chosen the same way, under the same budget.
    for name, c in summary["kfac"]["compared"].items():
        if c["chosen"]["params"] is not None:
            assert c["chosen"]["perplexity_change"] <= cal["max_ppl_increase"], name
            assert c["never_seen"]["n_recited"] == halves["evaluation"]["recited"]


def test_run_chooses_on_one_half_and_scores_on_the_other(tiny_run):
    out, summary = tiny_run
    written = json.loads((out / "summary.json").read_text())
    assert set(STEPS) | {"seconds", "calibration"} <= set(written)
    assert {k: written[k] for k in STEPS} == plain({k: summary[k] for k in STEPS})
    assert summary["skipped"] == {} and summary["skipped_parts"] == []
    check_protocol(out, summary)
    recited = Extraction.from_json(summary["labels"]).exact
    assert recited["100"] >= 0.9 and recited["0"] == 0.0
    assert summary["probes"]["auroc"] > 0.8
    # Measured on the tiny organism (seed 0): steering 64% of the 14 recited evaluation
    # records, the K-FAC edit 43%; steering that added the vector, or an edit aimed the
    # wrong way, removes none.
    assert summary["steering"]["never_seen"]["removed"] >= 0.3
    assert summary["steering"]["exact_after"]["100"] <= 0.6
    assert summary["kfac"]["never_seen"]["removed"] >= 0.2
    assert len(summary["layernorm"]["grad_ratio_by_module"]) == 4  # 2 blocks x 2 norms
    audit = summary["audit"]
    baselines = {METHODS[m] for m, r in summary["unlearn"]["methods"].items()
                 if r["chosen"]["params"] is not None}
    assert set(audit) == {"forget", "skipped_parts", "relearn_blocks", "best", "unedited",
                          "retrain without", "K-FAC edit", "neuron ablation", "steering",
                          "norm removal"} | baselines
    assert audit["relearn_blocks"] is None  # trained from scratch: every weight
    assert audit["unedited"]["exact"] >= 0.8 and audit["retrain without"]["exact"] == 0
    assert audit["retrain without"]["mia_auroc_loss"] < 0.8 < audit["unedited"]["mia_auroc_loss"]
    assert audit["K-FAC edit"]["exact"] < audit["unedited"]["exact"]
    assert set(audit["forget"]["ids"]) <= set(summary["calibration"]["evaluation_ids"])
    for name in ("unedited", "retrain without", "K-FAC edit"):
        ci = audit[name]["ci"]  # over the forget records (and non-members, for membership)
        assert ci["exact"][0] <= audit[name]["exact"] <= ci["exact"][1], name
        assert ci["mia_auroc"]["loss"][0] <= audit[name]["mia_auroc_loss"] <= ci[
            "mia_auroc"]["loss"][1], name
    # The probes are scored against the model's own confidence on the same tokens.
    probes = summary["probes"]
    assert probes["confidence"]["probe"] == "confidence"
    top = probes["best_overall"]
    assert top["gain_over_confidence"][0] == pytest.approx(
        top["auroc"] - probes["confidence"]["auroc"])


def test_baselines_are_chosen_like_the_removals_and_audited_in_the_fields_terms(tiny_run):
    _, summary = tiny_run
    cal, halves = summary["calibration"], summary["labels"]["halves"]
    methods = summary["unlearn"]["methods"]
    assert set(methods) == set(METHODS)
    for name, r in methods.items():
        chosen = r["chosen"]
        assert chosen["params"] is not None, name  # measured: every method has a setting
        assert chosen["perplexity_change"] <= cal["max_ppl_increase"], name
        f = r["forget_set"]
        # Told the evaluation half's recited records, each lowers their extraction, and
        # held-out perplexity stays within the budget it was calibrated to (measured on the
        # tiny organism: 29-100% removed at -1.1% to +2.7%).
        assert f["n_recited"] == halves["evaluation"]["recited"], name
        assert f["removed"] > 0, name
        assert f["perplexity_change"] <= cal["max_ppl_increase"], name
    audit = summary["audit"]
    for name, row in audit.items():
        if not isinstance(row, dict) or "exact" not in row:
            continue
        assert row["told_forget_set"] == (name in {METHODS[m] for m in methods}), name
        leak = row["privleak"]
        assert set(leak) == {"loss", "min_k", "min_k_pp", "zlib", "neighbourhood"}, name
        for attack, v in leak.items():
            if v["ci"] is not None:
                assert v["ci"][0] - 1e-9 <= v["value"] <= v["ci"][1] + 1e-9, (name, attack)
        lo, hi = row["ci"]["verbmem"]
        assert lo <= row["verbmem"] <= hi
    # The model that never saw the forget set is the zero of PrivLeak; the unedited model,
    # which recites it, sits near -100 and repeats it word for word.
    assert all(v["value"] == 0 for v in audit["retrain without"]["privleak"].values())
    assert audit["unedited"]["privleak"]["min_k"]["value"] < -90
    assert audit["unedited"]["verbmem"] > 0.95 > audit["retrain without"]["verbmem"]
    table = markdown_audit_table(audit).splitlines()
    rows = [n for n, v in audit.items() if isinstance(v, dict) and "exact" in v]
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| unedited |") and table[-1].startswith("| retrain without |")
    # 9 columns scored (3 extraction, VerbMem, 4 PrivLeak, perplexity), each best in bold
    # (none where every removal ties).
    assert 5 <= len(audit["best"]) <= 9
    assert sum(line.count("**") // 2 for line in table) == sum(map(len, audit["best"].values()))


def test_text_only_jsonl_runs_every_step_and_says_what_it_skipped(tiny_organism, tmp_path):
    rows = [json.loads(line) for line in (tiny_organism / "corpus.jsonl").open()]
    texts = ([r for r in rows if r["role"] == "canary"]
             + [r for r in rows if r["role"] == "general"][:60])
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in texts))
    out = tmp_path / "run"
    summary = run(tiny_organism, data, out, progress=False)
    assert summary["skipped"] == {}  # every step ran
    check_protocol(out, summary)
    parts = summary["skipped_parts"]
    assert len(parts) == 5 and all("skipped: " in p for p in parts)
    assert any(p.startswith("Loss-matched forgetting skipped") for p in parts)
    assert set(summary["unlearn"]["methods"]) == set(METHODS) - {"matched"}
    assert any("by duplication" in p and "'duplication' count" in p for p in parts)
    assert sum("Membership inference" in p and "'duplication': 0" in p for p in parts) == 2
    assert any("retrain-without" in p and "--reference" in p for p in parts)
    page = (out / "report.html").read_text()
    assert page.count("<b>Skipped.</b>") == 5
    assert "retrain without" not in summary["audit"]
    assert summary["audit"]["unedited"]["mia_auroc_loss"] is None
    assert "membership_auroc" not in json.loads((out / "labels" / "summary.json").read_text())


def test_layernorm_command_on_a_post_ln_model_runs_only_the_steps_it_reads(tmp_path,
                                                                          capsys):
    postln = organism_path("tiny-deep", "opt-postln", progress=False)  # notebook 05's
    out = tmp_path / "ln"
    assert main(["layernorm", "--model", str(postln), "--data", str(postln),
                 "--out", str(out), "--norm-strengths", "0.5", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(STEPS) & set(summary) == {"labels", "layernorm"}
    ln = summary["layernorm"]
    assert ln["placement"] == "Post-LN" and len(ln["grad_ratio_by_module"]) == 12  # 6 x 2
    curve = ln["chosen"]["curve"]
    assert {c["params"]["strength"] for c in curve} <= {0.5, 1.0}
    assert {c["params"]["group"] for c in curve} == {"early", "middle", "late"}
    assert "layernorm: Removing norm parameters (Post-LN)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--model", str(postln), "--data", str(postln), "--steps", "layrnorm"])


def strict_json(text: str):
    """Parse as standard JSON does (JavaScript's JSON.parse, jq): NaN and Infinity refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_artifact_is_strict_json_and_no_lock_file_is_left(tiny_run):
    out, summary = tiny_run
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


def test_demo_second_run_reuses_every_step(tiny_run, capsys):
    out, first = tiny_run
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()}
    again = run_demo(out, preset="tiny", progress=False)
    printed = capsys.readouterr().out
    assert printed.count(": cached") == len(STEPS)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()} == stamps
    assert plain({k: again[k] for k in STEPS}) == plain({k: first[k] for k in STEPS})


def test_report_renders_offline_in_headless_chromium(tiny_run, render):
    out, _ = tiny_run
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




def test_the_lens_of_the_last_block_is_the_models_own_confidence(tiny_run, tiny_organism):
    """The logit-lens probe features are read at the state that predicts each token: at the
    last block they are the model's own prediction, max log-prob and entropy, as the labels
    recorded them for that token; earlier blocks predict it less often."""
    from memlens.core.model import load_model
    from memlens.data.labels import Labels
    from memlens.data.store import ActivationStore
    from memlens.methods.probes import ProbeData
    from memlens.methods.probes.lens import LENS_COLUMNS, lens_features

    out, _ = tiny_run
    data = ProbeData.from_store(ActivationStore.open(out / "activations"),
                                Labels.load(out / "labels"))
    lens = lens_features(load_model(tiny_organism), data, progress=False)
    per_site = lens.reshape(len(data.tokens), -1, len(LENS_COLUMNS))
    last = dict(zip(LENS_COLUMNS, per_site[:, -1].T, strict=True))
    assert (last["agrees"] == 1).all()
    assert last["logprob_of_prediction"] == pytest.approx(last["max_logprob"], abs=1e-5)
    assert last["max_logprob"] == pytest.approx(data.tokens["max_logprob"].to_numpy(), abs=1e-4)
    assert last["entropy"] == pytest.approx(data.tokens["entropy"].to_numpy(), abs=1e-4)
    assert per_site[:, 0, 3].mean() < 0.9
