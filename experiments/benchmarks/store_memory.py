"""Peak memory of probe training against the size of the store it reads.

    python experiments/benchmarks/store_memory.py [--tokens 20000] [--scale 10]

Two stores from one random-init Llama-shaped model (`--d-model` wide, `--blocks` blocks;
every position of random token sequences at every block's residual stream, float16): a
small one of `--tokens` tokens and one `--scale` times larger. Each is probed in a fresh
process, on labels that mark a random direction's positive side as memorized (so the probe
has something to find): streamed (`ProbeConfig.chunk_mb`, here 16 so that both stores take
several chunks) and, as the baseline, with each site's features loaded whole first, as
memlens did before streaming.
`peak_rss_ratio_streamed` is the larger store's peak RSS over the smaller's (goal: flat,
<= 1.2) where the baseline grows with the store; `growth_over_store_growth` is how much
of the store's growth shows up in memory (the per-token tables grow with the tokens; the
features do not).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import current_rss_mb, peak_rss_mb, random_model_dir

from memlens.core import jsonio
from memlens.core.model import load_model
from memlens.core.sequences import Sequence
from memlens.data.store import ActivationStore, CaptureConfig, capture
from memlens.methods.probes import ProbeConfig, ProbeData, probe_sweep


def build_store(model_dir: Path, out: Path, n_tokens: int, seq_len: int = 128) -> None:
    handle = load_model(model_dir)
    rng = np.random.default_rng(0)
    seqs = [Sequence(f"s{i}", rng.integers(3, 1000, seq_len).tolist(), duplication=i % 2)
            for i in range(n_tokens // seq_len)]
    capture(handle, seqs, CaptureConfig(sites=["blocks.*.hook_resid_post"], dtype="float16",
                                        batch_size=32), out)


def labels_for(store: ActivationStore) -> pd.DataFrame:
    tok = store.tokens[["id", "position", "token_id", "duplication"]].copy()
    tok["position"] += 1  # "predicting" alignment reads the state before each token
    site = store.sites[-1]
    direction = np.random.default_rng(1).normal(size=store.manifest["shapes"][site][0])
    along = np.concatenate([store.rows(site, np.arange(i, min(i + 8192, len(tok))))
                            .numpy() @ direction for i in range(0, len(tok), 8192)])
    tok["label"] = np.where(along > np.median(along), "memorized", "not_memorized")
    for col in ("logprob", "max_logprob", "entropy"):
        tok[col] = np.random.default_rng(2).normal(size=len(tok)).astype(np.float32)
    return tok


def child(store_dir: Path, mode: str, chunk_mb: int) -> dict:
    before = current_rss_mb()
    t0 = time.perf_counter()
    store = ActivationStore.open(store_dir, verify=False)
    data = ProbeData.from_store(store, pd.read_parquet(store_dir.parent / f"{store_dir.name}"
                                                       ".labels.parquet"),
                                ProbeConfig(n_bootstrap=0, chunk_mb=chunk_mb))
    if mode == "whole":  # the old reader: every site loaded into memory at once
        data.features = {s: data.features[s] for s in data.features}
        data.config.chunk_mb = 1 << 20
    sweep = probe_sweep(data, control=False, progress=False)
    auroc = sweep.results.set_index("probe")["auroc"][store.sites[-1]]
    return {"rows": store.n_rows, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
            "probe_memory_mb": peak_rss_mb() - before, "auroc": float(auroc),
            "seconds": time.perf_counter() - t0}


def run_child(store_dir: Path, mode: str, chunk_mb: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(store_dir), "--mode", mode,
           "--chunk-mb", str(chunk_mb)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--chunk-mb", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/memlens-store-memory"))
    ap.add_argument("--out", type=Path, default=Path("experiments/results/store_memory.json"))
    ap.add_argument("--keep", action="store_true", help="keep the stores in --work")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="streamed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.chunk_mb)))
        return
    model = random_model_dir(args.work / f"model-d{args.d_model}-{args.blocks}", "llama",
                             hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                             num_hidden_layers=args.blocks, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=1024,
                             max_position_embeddings=512)
    runs = []
    for name, n in (("small", args.tokens), ("large", args.tokens * args.scale)):
        store = args.work / f"store-{name}"
        if not (store / "manifest.json").exists():
            build_store(model, store, n)
            labels_for(ActivationStore.open(store)).to_parquet(
                store.parent / f"{store.name}.labels.parquet")
        for mode in ("streamed", "whole"):
            runs.append({"store": name, "mode": mode, **run_child(store, mode, args.chunk_mb),
                         "store_mb": round(sum(f.stat().st_size for f in store.rglob("*")
                                                if f.is_file()) / 2**20, 1)})
            print(json.dumps(runs[-1]), flush=True)
    by = {(r["store"], r["mode"]): r for r in runs}
    store_growth = by["large", "streamed"]["store_mb"] - by["small", "streamed"]["store_mb"]
    result = {"goal_peak_rss_ratio_streamed": 1.2, "chunk_mb": args.chunk_mb,
              "d_model": args.d_model, "blocks": args.blocks, "runs": runs}
    for mode in ("streamed", "whole"):
        large, small = by["large", mode]["peak_rss_mb"], by["small", mode]["peak_rss_mb"]
        result[f"peak_rss_ratio_{mode}"] = round(large / small, 3)
        result[f"growth_over_store_growth_{mode}"] = round((large - small) / store_growth, 3)
    print(f"{'store':6} {'mode':9} {'rows':>8} {'store MB':>9} {'probe MB':>9} "
          f"{'seconds':>8} {'AUROC':>6}")
    for r in runs:
        print(f"{r['store']:6} {r['mode']:9} {r['rows']:>8} {r['store_mb']:>9} "
              f"{r['probe_memory_mb']:>9.0f} {r['seconds']:>8.1f} {r['auroc']:>6.3f}")
    print(f"large / small peak RSS: streamed {result['peak_rss_ratio_streamed']}, whole "
          f"sites {result['peak_rss_ratio_whole']}; memory growth / store growth: streamed "
          f"{result['growth_over_store_growth_streamed']}, whole sites "
          f"{result['growth_over_store_growth_whole']}")
    jsonio.write(args.out, result)
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
