"""Fault injection: SIGKILL at seeded random points of capture, K-FAC collection, organism
training and labeling; each kill is followed by a rerun whose result equals an
uninterrupted run."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

POINTS = 10  # kills per operation

# A warm process that loads everything once, then forks one child per run: the child does
# the operation, and is SIGKILLed after the given delay if it has not finished. (One thread:
# a process that started no thread pool forks safely.)
ZYGOTE = """
import json, os, signal, sys, time
import torch
import tqdm
torch.set_num_threads(1)
# No tqdm monitor thread: a fork while it holds tqdm's lock leaves the child waiting forever.
tqdm.tqdm.monitor_interval = 0
org = sys.argv[1]
from memlens.core.model import load_model
from memlens.data.labels import LabelConfig, label, read_sequences
from memlens.data.store import CaptureConfig, capture
from memlens.methods.curvature import KFACConfig, collect_factors
from memlens.data.corpus import CorpusConfig
from memlens.data.organism import OrganismPreset, train_organism
handle = load_model(org)
seqs = read_sequences(org, handle.tokenizer, roles=("canary", "nonmember"))[:40]
general = [s.token_ids for s in read_sequences(org, handle.tokenizer, roles=("general",))][:96]
preset = OrganismPreset(corpus=CorpusConfig(n_general=120, canaries_per_count=1,
                        duplication_counts=(1, 5), n_nonmembers=4), vocab_size=300,
                        d_model=32, n_layers=1, n_heads=2, d_mlp=64, epochs=4, max_len=48)

def work(op, out):
    if op == "capture":
        capture(handle, seqs, CaptureConfig(sites=["blocks.0.hook_resid_post",
                "blocks.1.hook_resid_post"], shard_sequences=4, batch_size=4), out,
                progress=False)
    elif op == "kfac":
        collect_factors(handle, general, KFACConfig(batch_size=4), out=out, progress=False,
                        checkpoint_every=2)
    elif op == "label":
        label(handle, seqs, LabelConfig(batch_size=4), progress=False).save(out)
    else:
        train_organism(out, preset, progress=False)

print("ready", flush=True)
for line in sys.stdin:
    op, out, delay, fsize = line.split()
    t0 = time.perf_counter()
    errors_r, errors_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(errors_r)
        if fsize != "none":  # a disk that takes no file beyond fsize bytes
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE,
                               (int(fsize), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            work(op, out)
            os._exit(0)
        except BaseException as exc:
            os.write(errors_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            os._exit(1)
    os.close(errors_w)
    deadline = None if delay == "none" else t0 + float(delay)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "killed"
            break
        time.sleep(0.005)
    error = os.read(errors_r, 4096).decode()
    os.close(errors_r)
    result = "killed" if status == "killed" else ("ok" if status == 0 else "failed")
    print(result, time.perf_counter() - t0, json.dumps(error), flush=True)
"""


@pytest.fixture(scope="module")
def zygote(tiny_organism):
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(tiny_organism)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def run(zygote, op, out, kill_after=None, max_file_bytes=None) -> float | None:
    """Run ``op`` into ``out`` in a fresh child; with ``kill_after`` (s), SIGKILL it then.
    Returns how long the work took, or None if it was killed."""
    result, seconds, error = _run(zygote, op, out, kill_after, max_file_bytes)
    assert result in ("ok", "killed"), f"{op} into {out} failed: {error}"
    return float(seconds) if result == "ok" else None


def _run(zygote, op, out, kill_after=None, max_file_bytes=None) -> tuple[str, str, str]:
    delay = "none" if kill_after is None else f"{kill_after:.4f}"
    zygote.stdin.write(f"{op} {out} {delay} {max_file_bytes or 'none'}\n")
    zygote.stdin.flush()
    result, seconds, error = zygote.stdout.readline().split(" ", 2)
    return result, seconds, json.loads(error)


def snapshot(op, out):
    """What an operation's result is, to compare runs."""
    if op == "capture":
        from memlens.data.store import ActivationStore

        store = ActivationStore.open(out)
        return {"tokens": store.tokens.to_dict("list"),
                **{s: store.array(s).tolist() for s in store.sites}}
    if op == "kfac":
        from memlens.methods.curvature import Factors

        f = Factors.load(out)
        return {"tokens": f.tokens, **{k: v.tolist() for k, v in {**f.A, **f.G}.items()}}
    if op == "label":
        import pandas as pd

        return {"seqs": pd.read_parquet(out / "sequences.parquet").drop(
            columns=["token_ids"]).to_dict("list"),
            "tokens": pd.read_parquet(out / "tokens.parquet").to_dict("list")}
    weights = load_file(out / "model.safetensors")
    return {k: v.tolist() for k, v in weights.items()}


def close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and a and isinstance(a[0], (list, float)):
        return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float),
                           rtol=1e-5, atol=1e-7)
    return a == b


@pytest.mark.parametrize("op", ["capture", "kfac", "label", "organism"])
def test_killed_runs_rerun_to_the_uninterrupted_result(op, zygote, tmp_path):
    reference = tmp_path / "reference"
    duration = run(zygote, op, reference)
    want = snapshot(op, reference)
    rng = random.Random(f"faults:{op}")
    killed = 0
    for trial in range(POINTS // 2):
        out = tmp_path / f"run{trial}"
        # Two kills at seeded random points of the work, each followed by a rerun (the
        # second kill hits that rerun), then a rerun that finishes.
        for _ in range(2):
            killed += run(zygote, op, out, rng.uniform(0.02, duration)) is None
        run(zygote, op, out)
        assert close(snapshot(op, out), want), f"{op}: trial {trial} differs from the reference"
    assert killed >= POINTS // 2  # most kills landed before the work was done
    leftovers = [p for p in tmp_path.rglob("*")
                 if p.is_file() and p.name.endswith((".tmp", ".partial"))]
    assert leftovers == []


def _litter(root):
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


@pytest.mark.parametrize("op", ["capture", "kfac", "label", "organism"])
def test_a_full_disk_fails_by_name_and_a_rerun_completes(op, zygote, tmp_path):
    """A disk that refuses writes (here: a file-size limit, which the OS enforces like a full
    disk) stops the run with an error naming the output; nothing half-written is left that
    a later run could take for finished work, and the rerun gives the uninterrupted result."""
    reference = tmp_path / "reference"
    run(zygote, op, reference)
    want = snapshot(op, reference)
    sizes = sorted(p.stat().st_size for p in ([reference] if reference.is_file()
                                              else reference.rglob("*")) if p.is_file())
    rng = random.Random(f"disk:{op}")
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        limit = rng.randint(1, sizes[-1] - 1)  # below the largest file: some write fails
        result, _, error = _run(zygote, op, out, max_file_bytes=limit)
        assert result == "failed", f"{op} wrote every file under a {limit}-byte limit"
        assert error.startswith("OutputError: could not write") and str(out) in error, error
        assert "File too large" in error and "rerun the same command" in error, error
        assert _litter(tmp_path) == [], f"{op} left temporary files after a refused write"
        if op == "label":
            assert not out.exists()  # whole or nothing
        elif op == "kfac":
            assert not out.exists()  # only a checkpoint at OUT.partial
        elif op == "capture" and (out / "manifest.json").exists():
            assert not json.loads((out / "manifest.json").read_text())["complete"]
        run(zygote, op, out)
        assert close(snapshot(op, out), want), f"{op}: rerun {trial} differs from the reference"
