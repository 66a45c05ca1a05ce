"""Steered vs plain generation: the cost of the steering hook, static and probe-gated.

    python experiments/benchmarks/steering.py [--preset small] [--prompts 64] [--tokens 32]

Same prompts (canary prefixes), same number of new tokens (greedy, no early stop), KV cache
on. `generation_overhead` is steered / plain wall time for the probe-gated (dynamic) hook,
median of interleaved repeats; the static hook is reported beside it.
"""

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

from memlens import load_model, organism_path, read_sequences
from memlens.core import jsonio
from memlens.data.labels import LabelConfig, label
from memlens.methods.steering import memorization_states, steer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--site", default="blocks.1.hook_resid_post")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/steering.json"))
    args = ap.parse_args()
    path = organism_path(args.preset, "llama")
    handle = load_model(path)
    seqs = read_sequences(path / "corpus.jsonl", handle.tokenizer, roles=("canary", "nonmember"))
    tokens = label(handle, seqs, LabelConfig(generate=False), progress=False).tokens
    states = memorization_states(handle, args.site, seqs, tokens)
    probe, vector = states.fit_probe(), states.mean_difference()
    prompts = [s.token_ids[:32] for s in seqs if s.duplication][:args.prompts]
    batches = [handle.pad(prompts[i:i + args.batch_size], side="left")
               for i in range(0, len(prompts), args.batch_size)]
    kwargs = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                  pad_token_id=handle.tokenizer.pad_token_id, use_cache=True)
    modes = {"plain": nullcontext,
             "static": lambda: steer(handle, args.site, vector, 1.0),
             "dynamic": lambda: steer(handle, args.site, vector, 1.0, probe=probe)}

    def run(mode):
        t = time.perf_counter()
        with modes[mode]():
            for ids, mask in batches:
                handle.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return time.perf_counter() - t

    for mode in modes:  # warm-up
        run(mode)
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(run(m))
    ratio = {m: statistics.median(t / p for t, p in zip(times[m], times["plain"], strict=True))
             for m in ("static", "dynamic")}
    result = {"generation_overhead": round(ratio["dynamic"], 3),
              "static_overhead": round(ratio["static"], 3), "goal": 1.10,
              "median_seconds": {m: round(statistics.median(t), 3) for m, t in times.items()},
              "prompts": len(prompts), "new_tokens": args.tokens, "site": args.site}
    print(f"{'mode':8} {'median s':>9} {'vs plain':>9}")
    for m in modes:
        r = 1.0 if m == "plain" else ratio[m]
        print(f"{m:8} {result['median_seconds'][m]:>9} {r:>9.3f}")
    jsonio.write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
