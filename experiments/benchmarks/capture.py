"""Capture cost against a plain forward pass, and memory against the number of tokens.

    python experiments/benchmarks/capture.py [--backend bridge] [--big-tokens 5000000]

On the small organism: `overhead_one_site` and `overhead_all_resid` are capture wall
time (forward + writing the store) over plain forward wall time on the same batches,
interleaved and repeated; `rss_delta_mb` is the peak RSS of capturing `--big-tokens`
tokens at one site minus that of capturing `--small-tokens` (0.1M), each in a fresh process.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import current_rss_mb, peak_rss_mb

from memlens.core import jsonio
from memlens.core.model import load_model
from memlens.data.labels import read_sequences
from memlens.data.organism import organism_path
from memlens.data.store import CaptureConfig, capture


def corpus(handle, n_tokens: int):
    """Organism records, repeated under new ids until they hold ``n_tokens`` tokens."""
    base = read_sequences(handle.name, handle.tokenizer)
    out, total, rep = [], 0, 0
    while total < n_tokens:
        for s in base:
            take = min(len(s.token_ids), n_tokens - total)
            out.append(replace(s, id=f"{rep}:{s.id}", token_ids=s.token_ids[:take]))
            total += take
            if total >= n_tokens:
                break
        rep += 1
    return out


@torch.no_grad()
def plain_forward(handle, seqs, batch_size):
    for i in range(0, len(seqs), batch_size):
        ids, mask = handle.pad([s.token_ids for s in seqs[i:i + batch_size]])
        handle.model(input_ids=ids, attention_mask=mask, position_ids=handle.position_ids(mask))


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(args):
    """Capture n tokens at one site in this process; print peak RSS in MB."""
    handle = load_model(organism_path(args.preset, args.arch))
    seqs = corpus(handle, args.child_tokens)
    before = current_rss_mb()
    capture(handle, seqs, CaptureConfig(sites=[args.one_site], backend=args.backend),
            args.child_out, progress=False)
    peak = peak_rss_mb()
    print(json.dumps({"peak_rss_mb": peak, "rss_before_capture_mb": before}))


def rss_of(args, n_tokens, tmp):
    out = Path(tmp) / f"rss_{n_tokens}"
    cmd = [sys.executable, __file__, "--child-tokens", str(n_tokens), "--child-out", str(out),
           "--preset", args.preset, "--arch", args.arch, "--backend", args.backend,
           "--one-site", args.one_site]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    shutil.rmtree(out)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--backend", default="bridge")
    ap.add_argument("--one-site", default=None, help="default: the last block's resid_post")
    ap.add_argument("--tokens", type=int, default=300_000, help="tokens per timing run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-tokens", type=int, default=5_000_000)
    ap.add_argument("--small-tokens", type=int, default=100_000,
                    help="the memory baseline's token count")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/capture.json"))
    ap.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    handle = load_model(organism_path(args.preset, args.arch))
    args.one_site = args.one_site or f"blocks.{handle.n_layers - 1}.hook_resid_post"
    if args.child_tokens:
        return child(args)

    seqs = corpus(handle, args.tokens)
    n_tokens = sum(len(s.token_ids) for s in seqs)
    batch = 32
    plain_forward(handle, seqs[:256], batch)  # warm up
    times = {"plain": [], "one_site": [], "all_resid": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            times["plain"].append(timed(lambda: plain_forward(handle, seqs, batch)))
            for key, sites in (("one_site", [args.one_site]),
                               ("all_resid", ["blocks.*.hook_resid_post"])):
                cfg = CaptureConfig(sites=sites, backend=args.backend, batch_size=batch)
                out = Path(tmp) / f"{key}{r}"
                times[key].append(timed(lambda cfg=cfg, out=out: capture(
                    handle, seqs, cfg, out, progress=False)))
                shutil.rmtree(out)
        small_rss = rss_of(args, args.small_tokens, tmp)
        big_rss = rss_of(args, args.big_tokens, tmp)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "backend": args.backend, "one_site": args.one_site, "n_tokens": n_tokens,
        "plain_forward_seconds": round(med["plain"], 3),
        "capture_one_site_seconds": round(med["one_site"], 3),
        "capture_all_resid_seconds": round(med["all_resid"], 3),
        "overhead_one_site": round(med["one_site"] / med["plain"], 3),
        "overhead_all_resid": round(med["all_resid"] / med["plain"], 3),
        "tokens_per_second": round(n_tokens / med["one_site"]),
        f"peak_rss_mb_{args.small_tokens / 1e6:g}M_tokens": round(small_rss["peak_rss_mb"], 1),
        f"peak_rss_mb_{args.big_tokens / 1e6:g}M_tokens": round(big_rss["peak_rss_mb"], 1),
        "rss_delta_mb": round(big_rss["peak_rss_mb"] - small_rss["peak_rss_mb"], 1),
        # Peak over RSS just before capture: what the capture itself holds.
        f"capture_rss_growth_mb_{args.small_tokens / 1e6:g}M_tokens": round(
            small_rss["peak_rss_mb"] - small_rss["rss_before_capture_mb"], 1),
        f"capture_rss_growth_mb_{args.big_tokens / 1e6:g}M_tokens": round(
            big_rss["peak_rss_mb"] - big_rss["rss_before_capture_mb"], 1),
        "all_times": times,
    }
    jsonio.write(args.out, result)
    print(f"{'run':<22}{'seconds':>9}{'ratio':>8}")
    print(f"{'plain forward':<22}{med['plain']:>9.2f}{1:>8.2f}")
    print(f"{'capture one site':<22}{med['one_site']:>9.2f}{result['overhead_one_site']:>8.2f}")
    print(f"{'capture all resid':<22}{med['all_resid']:>9.2f}"
          f"{result['overhead_all_resid']:>8.2f}")
    print(f"tokens/s {result['tokens_per_second']}, rss delta {result['rss_delta_mb']} MB "
          f"({args.big_tokens:,} vs {args.small_tokens:,} tokens)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
