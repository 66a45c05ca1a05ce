"""Every benchmark runs at its smallest settings: it exits 0 and writes strict JSON, so a
moved file or a renamed option cannot break one silently. (The figures themselves are
measured by running the benchmarks at their defaults; timings are not asserted here.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "experiments" / "benchmarks"

SMALLEST = {
    "capture.py": ["--preset", "tiny", "--tokens", "3000", "--repeats", "1",
                   "--small-tokens", "2000", "--big-tokens", "6000"],
    "gpu.py": ["--device", "cpu", "--models", "smollm2-135m", "--sequences", "8",
               "--generate-sequences", "4", "--probe-sequences", "16", "--batch-size", "4",
               "--repeats", "1", "--cpu-scale", "32"],
    "kfac.py": ["--preset", "tiny", "--arch", "llama", "--sequences", "16", "--batch-size",
                "8", "--repeats", "1"],
    "labeling.py": ["--preset", "tiny", "--n", "12"],
    "organism_training.py": ["--preset", "smollm2-tiny", "--steps", "1", "--repeats", "1"],
    "probes.py": ["--repeats", "1"],  # with a config on the tiny organism, below
    "steering.py": ["--preset", "tiny", "--prompts", "4", "--tokens", "4", "--batch-size", "4",
                    "--repeats", "1"],
    "store_memory.py": ["--tokens", "4000", "--scale", "2", "--d-model", "32", "--blocks", "2"],
}


def test_every_benchmark_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py"}
    assert scripts == set(SMALLEST)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_benchmark_runs_at_its_smallest_settings(script, tiny_organism, tmp_path):
    args = list(SMALLEST[script])
    if script == "probes.py":
        config = tmp_path / "probes.toml"
        config.write_text(
            f'out = "{tmp_path / "run"}"\n\n[model]\npath = "{tiny_organism}"\n\n[labels]\n'
            'prefix = 32\nsuffix = 32\n\n[capture]\nsites = ["blocks.*.hook_resid_post"]\n\n'
            '[probe]\nn_bootstrap = 0\n')
        args += ["--config", str(config)]
    if script == "store_memory.py":
        args += ["--work", str(tmp_path / "work")]
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert isinstance(result, dict) and result
    assert f"wrote {out}" in run.stdout
