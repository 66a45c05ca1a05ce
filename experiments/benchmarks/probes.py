"""Probe trainers: scikit-learn per-site fits vs one batched PyTorch fit of every site.

    python experiments/benchmarks/probes.py [--config organism | --config my.toml]

Same store, sites, features and split for both (the config's probe sweep, run first if
needed). `speedup` is sklearn fit time / torch fit time (median of interleaved repeats);
`max_auroc_gap` the largest per-site held-out AUROC difference between the trainers.
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from memlens.core import jsonio
from memlens.data.store import ActivationStore
from memlens.methods.probes import CONFIDENCE, ProbeData, fit_probes
from memlens.steps.probe import load_config, run_config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="organism")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/probes.json"))
    args = ap.parse_args()
    cfg = load_config(args.config)  # a TOML file or a config memlens ships
    run_dir = cfg.out
    if not (run_dir / "results.json").exists():
        run_config(cfg)
    store = ActivationStore.open(run_dir / "store")
    tokens = pd.read_parquet(run_dir / "labels" / "tokens.parquet")
    data = ProbeData.from_store(store, tokens, cfg.probe)
    y = data.tokens["y"].to_numpy()
    index = {k: np.flatnonzero(data.mask(k)) for k in ("train", "val", "test")}
    tasks = {s: ([s], y) for s in data.features if s != CONFIDENCE}

    times = {"sklearn": [], "torch": []}
    fits = {}
    for _ in range(args.repeats):
        for trainer in ("sklearn", "torch"):
            t0 = time.perf_counter()
            fits[trainer] = fit_probes(data, tasks, index, trainer, progress=False)
            times[trainer].append(time.perf_counter() - t0)
    rows = []
    for site in tasks:
        row = {"site": site, "d": len(fits["torch"][site].mean)}
        for trainer, fitted in fits.items():
            row[trainer] = roc_auc_score(y[index["test"]], fitted[site].test_score)
        rows.append(row)
    table = pd.DataFrame(rows)
    table["gap"] = (table["sklearn"] - table["torch"]).abs()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "n_sites": len(tasks), "n_train_tokens": len(index["train"]),
        "n_test_tokens": len(index["test"]),
        "sklearn_seconds": round(med["sklearn"], 3), "torch_seconds": round(med["torch"], 3),
        "speedup": round(med["sklearn"] / med["torch"], 2),
        "max_auroc_gap": round(float(table["gap"].max()), 5),
        "per_site": table.round(5).to_dict(orient="records"), "all_times": times,
        "sklearn_settings": "LogisticRegression(lbfgs, tol=1e-6, class-balanced, same L2)",
        "torch_settings": "batched Newton (d <= 1024) with validation early stopping, CPU fp32",
    }
    jsonio.write(args.out, result)
    print(table.round(4).to_string(index=False))
    print(f"sklearn {med['sklearn']:.2f} s, torch {med['torch']:.2f} s: "
          f"speedup {result['speedup']}x, max AUROC gap {result['max_auroc_gap']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
