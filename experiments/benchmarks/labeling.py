"""Exact extraction labels: batched teacher forcing vs per-sequence greedy generation.

    python experiments/benchmarks/labeling.py [--n 2000] [--out experiments/results/labeling.json]

Both paths label the same sequences of the small organism (prefix 32, suffix 32);
the JSON holds whether the labels are identical and the wall-time ratio.
"""

import argparse
import time
from pathlib import Path

import torch

from memlens.core import jsonio
from memlens.core.metrics import ExtractionConfig, exact_extraction
from memlens.core.model import load_model
from memlens.data.labels import read_sequences
from memlens.data.organism import organism_path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/labeling.json"))
    args = ap.parse_args()

    handle = load_model(organism_path(args.preset, args.arch))
    seqs = read_sequences(handle.name, handle.tokenizer)
    # Every canary and non-member, then general members up to n.
    planted = [s for s in seqs if s.duplication != 1]
    seqs = (planted + [s for s in seqs if s.duplication == 1])[:args.n]
    cfg = ExtractionConfig(prefix=32, suffix=32, batch_size=64)

    t0 = time.perf_counter()
    tf_exact = exact_extraction(handle, seqs, cfg)
    tf_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    gen_exact = []
    with torch.no_grad():
        for s in seqs:  # the usual check: generate the suffix greedily, one sequence at a time
            prefix = torch.tensor([s.token_ids[:32]])
            out = handle.model.generate(prefix, max_new_tokens=32, do_sample=False,
                                        pad_token_id=handle.tokenizer.pad_token_id)
            gen_exact.append(out[0, 32:].tolist() == s.token_ids[32:64])
    gen_seconds = time.perf_counter() - t0

    result = {
        "n_sequences": len(seqs),
        "labels_identical": tf_exact == gen_exact,
        "n_disagreements": sum(a != b for a, b in zip(tf_exact, gen_exact, strict=True)),
        "exact_extraction_rate": sum(tf_exact) / len(seqs),
        "teacher_forcing_seconds": round(tf_seconds, 3),
        "generation_seconds": round(gen_seconds, 3),
        "speedup": round(gen_seconds / tf_seconds, 2),
    }
    jsonio.write(args.out, result)
    print(f"{'method':<22}{'seconds':>10}")
    print(f"{'teacher forcing':<22}{tf_seconds:>10.2f}")
    print(f"{'greedy generation':<22}{gen_seconds:>10.2f}")
    print(f"speedup {result['speedup']}x, labels identical: {result['labels_identical']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
