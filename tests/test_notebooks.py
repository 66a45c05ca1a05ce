"""Every notebook runs top to bottom on the tiny organisms (06 on the SmolLM2 test organism),
what it computes is right, and its exported HTML draws every figure in headless Chromium."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbconvert import HTMLExporter

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# Per notebook: numbers it computes, read from its kernel after the last cell ran.
PROBES = {
    "01_explore": "dict(exact_100=result.extraction.exact['100'],"
                  " exact_0=result.extraction.exact['0'],"
                  " min_k=result.summary['membership_auroc']['min_k'], rows=store.n_rows,"
                  " n_tokens=int((store.tokens.position >= 32).sum()))",
    "02_probes": "dict(auroc=summary['best_token_auroc'],"
                 " probe_auroc=probe.metrics['auroc'], dim=int(direction.shape[0]))",
    "03_kfac": "dict(before=before.exact['100'],"
               " rho_08=float(keep_mass.loc['rho=0.8', '100x']), tokens=factors.tokens)",
    "04_interventions_steering": "dict(before=before.exact['100'],"
                                 " best_dynamic=float(sweep[sweep['mode'] == "
                                 "'dynamic'].exact_100.min()))",
    "05_layernorm": "dict(n_conditions=len(conditions), n_attribution=len(attribution),"
                    " kept=[c['recovery']['kept'] for c in conditions"
                    " if c['removed_group'] == 'none'])",
    "06_pretrained": "dict(bridge_diff=bridge_diff,"
                     " exact=s.exact,"
                     " best=float(table[table.probe != 'confidence'].auroc.max()),"
                     " matched=table.set_index('probe').matched_auroc.to_dict(),"
                     " kfac=kfac_table.to_dict('index'), before=before.exact,"
                     " steered=steered.exact,"
                     " neuron_blocks=sorted(set(int(x) for x in neurons.layer)), trained=trained,"
                     " norm_rows=len(norm_table))",
    "07_audit": "dict(rows={r['name']: dict(exact=r['after_edit']['exact'],"
                " int4=r['int4']['exact'], relearn=r['relearn']['50']['exact'],"
                " auroc=r['mia_auroc']['loss']) for r in results})",
}
CHECKS = {
    "01_explore": lambda v: v["exact_100"] >= 0.9 and v["exact_0"] == 0.0
    and v["min_k"] > 0.7 and v["rows"] == v["n_tokens"] > 1000,
    "02_probes": lambda v: v["auroc"] > 0.85 and v["probe_auroc"] > 0.85 and v["dim"] == 64,
    "03_kfac": lambda v: v["before"] >= 0.9 and v["rho_08"] <= 0.1
    and v["tokens"] >= 40_000,
    "04_interventions_steering": lambda v: v["before"] >= 0.8
    and v["best_dynamic"] < v["before"],
    "05_layernorm": lambda v: v["n_conditions"] >= 8 and v["n_attribution"] >= 24
    and all(k == 1.0 for k in v["kept"]),
    "06_pretrained": lambda v: v["bridge_diff"] < 1e-4 and v["exact"]["25"] == 1.0
    and v["exact"]["1"] == 0.0 and 0 <= v["best"] <= 1
    and all(0 <= m <= 1 for m in v["matched"].values())
    and v["kfac"]["keep-mass rho=0.9"]["25x"] == 0.0
    and v["steered"]["25"] < v["before"]["25"]
    and v["neuron_blocks"] == v["trained"] and v["norm_rows"] == 4,
    "07_audit": lambda v: len(v["rows"]) == 4
    and v["rows"]["unedited"]["exact"] >= 0.9 and v["rows"]["retrain without"]["exact"] == 0
    and v["rows"]["retrain without"]["auroc"] < 0.75 < v["rows"]["unedited"]["auroc"]
    and all(r["exact"] <= 0.5 for k, r in v["rows"].items() if k.startswith(("K-FAC", "Bal"))),
}


PLOTLY = "application/vnd.plotly.v1+json"


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no headless Chromium for the export check: apt-get install chromium")


def drawn_figures(page: Path) -> tuple[int, int]:
    """(plotly figures on the page, figures plotly.js drew) after Chromium ran its scripts."""
    dom = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=30000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    divs = re.findall(r'<div[^>]*class="plotly-graph-div([^"]*)"', dom)
    return len(divs), sum("js-plotly-plot" in c for c in divs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_computes_what_it_shows(path, tiny_organism, request, monkeypatch,
                                                  tmp_path):
    monkeypatch.setenv("MEMLENS_PRESET", "tiny")
    if path.stem == "06_pretrained":  # the real model, on its test organism
        request.getfixturevalue("smollm2_organism")
        monkeypatch.setenv("MEMLENS_PRETRAINED_PRESET", "smollm2-tiny")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import json as _json\nprint(_json.dumps({PROBES[path.stem]}))"))
    # From a folder outside the checkout: nothing may depend on the working directory.
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"{path.stem}: {time.perf_counter() - t0:.0f} s")
    outputs = [o for cell in nb.cells[:-1] if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len(outputs) >= 5
    values = json.loads(nb.cells[-1].outputs[-1]["text"])
    assert CHECKS[path.stem](values), values

    # Quiet: no widget warnings, no progress refreshes piling up in the cells.
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "IProgress not found" not in stderr and stderr.count("\r") < 50, stderr[-2000:]
    # Every section that shows a result says what it found.
    assert sum("**Finding.**" in o.get("data", {}).get("text/markdown", "") for o in outputs) >= 1

    # Exported to HTML (what a shared notebook shows), every figure draws, offline.
    figures = sum(PLOTLY in o.get("data", {}) for o in outputs)
    assert figures >= 1
    page = tmp_path / f"{path.stem}.html"
    page.write_text(HTMLExporter().from_notebook_node(nb)[0], encoding="utf-8")
    assert drawn_figures(page) == (figures, figures)
