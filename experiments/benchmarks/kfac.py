"""K-FAC factor collection cost against a plain forward + backward over the same tokens.

    python experiments/benchmarks/kfac.py [--preset small] [--arch llama gpt2]

`collect_vs_fwd_bwd` is the wall time of `collect_factors` (true Fisher, every MLP
projection) divided by the wall time of a plain training-style forward + backward (gold
labels, parameter gradients) over the same batches; median of interleaved repeats.
`peak_rss_mb` is the process's peak resident memory after the runs, `factors_mb` the size
of the factors themselves.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import peak_rss_mb

from memlens import load_model, organism_path, read_sequences
from memlens.core import jsonio
from memlens.methods.curvature import KFACConfig, collect_factors


def fwd_bwd(handle, seqs, batch_size):
    model = handle.model
    for i in range(0, len(seqs), batch_size):
        ids, mask = handle.pad(seqs[i:i + batch_size], side="right")
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1), reduction="sum")
        loss.backward()
    model.zero_grad(set_to_none=True)


def bench(arch, preset, n_seqs, repeats, batch_size):
    path = organism_path(preset, arch)
    handle = load_model(path)
    seqs = [s.token_ids for s in read_sequences(path / "corpus.jsonl", handle.tokenizer,
                                                roles=("general",))][:n_seqs]
    cfg = KFACConfig(batch_size=batch_size)
    collect_factors(handle, seqs[:batch_size * 2], cfg, progress=False)  # warm-up
    fwd_bwd(handle, seqs[:batch_size * 2], batch_size)
    t_collect, t_plain = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        factors = collect_factors(handle, seqs, cfg, progress=False)
        t_collect.append(time.perf_counter() - t)
        t = time.perf_counter()
        fwd_bwd(handle, seqs, batch_size)
        t_plain.append(time.perf_counter() - t)
    size = sum(a.numel() + g.numel() for a, g in zip(factors.A.values(), factors.G.values(),
                                                     strict=True)) * 4
    return dict(arch=arch, tokens=factors.tokens, layers=len(factors.layers),
                collect_s=round(statistics.median(t_collect), 3),
                fwd_bwd_s=round(statistics.median(t_plain), 3),
                collect_vs_fwd_bwd=round(statistics.median(
                    c / p for c, p in zip(t_collect, t_plain, strict=True)), 3),
                factors_mb=round(size / 2**20, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", nargs="+", default=["llama", "gpt2"])
    ap.add_argument("--sequences", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/kfac.json"))
    args = ap.parse_args()
    rows = [bench(a, args.preset, args.sequences, args.repeats, args.batch_size)
            for a in args.arch]
    peak = peak_rss_mb()
    print(f"{'arch':6} {'tokens':>7} {'layers':>6} {'collect s':>9} {'fwd+bwd s':>9} "
          f"{'ratio':>6} {'factors MB':>10}")
    for r in rows:
        print(f"{r['arch']:6} {r['tokens']:>7} {r['layers']:>6} {r['collect_s']:>9} "
              f"{r['fwd_bwd_s']:>9} {r['collect_vs_fwd_bwd']:>6} {r['factors_mb']:>10}")
    print(f"peak RSS {peak:.0f} MB")
    result = {"collect_vs_fwd_bwd": max(r["collect_vs_fwd_bwd"] for r in rows),
              "peak_rss_mb": round(peak, 1), "goal_collect_vs_fwd_bwd": 1.5, "runs": rows}
    jsonio.write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
