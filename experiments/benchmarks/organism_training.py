"""Continued pre-training of the top blocks: the whole model per step vs the top blocks run
from the frozen blocks' output, computed once per record.

    python experiments/benchmarks/organism_training.py [--preset smollm2-40] [--steps 6]

Same batches of the preset's training stream, the same trained parameters and optimizer,
interleaved repeats. `step_speedup` is full / cached seconds per step; `epoch_speedup`
charges the cached paths with computing every record's frozen output once (amortized over
the preset's epochs), as training does. A third path runs the cached one under bfloat16
autocast, for comparison.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from memlens import load_model
from memlens.core import jsonio
from memlens.core.modules import block_parameters, only_top_blocks
from memlens.core.scoring import forward, token_losses
from memlens.core.sites import block_input
from memlens.data.corpus import build_corpus
from memlens.data.organism import PRESETS

# The whole model per step; the top blocks from the frozen blocks' output (what organism
# training does); the same under bfloat16 autocast (weights stay float32; not used for
# organisms: it changes the trained weights).
PATHS = ("full", "cached", "cached, bf16")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-40")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/organism_training.json"))
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    handle = load_model(preset.base, dtype=torch.float32)
    model, k = handle.model, preset.train_blocks
    n = model.config.num_hidden_layers
    corpus = build_corpus(preset.corpus)
    ids_of = {r.id: handle.tokenizer(r.text)["input_ids"][:preset.max_len] for r in corpus.records}
    stream = [r.id for r in corpus.training_stream()]
    unique = sorted(set(stream))
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(block_parameters(model, range(n - k, n)).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6)
    batches = [stream[i:i + preset.batch_size]
               for i in range(0, args.steps * preset.batch_size, preset.batch_size)]

    t = time.perf_counter()
    entering = {}
    with torch.no_grad():
        for i in range(0, len(unique), 16):
            chunk = unique[i:i + 16]
            ids, mask = handle.pad([ids_of[j] for j in chunk])
            for j, row in zip(chunk, block_input(model, ids, mask, n - k), strict=True):
                entering[j] = row[:len(ids_of[j])].clone()
    prefix_seconds = time.perf_counter() - t

    def step(batch, path):
        ids, mask = handle.pad([ids_of[j] for j in batch])
        if path == "full":
            logits = forward(handle, ids, mask)
        else:
            states = torch.nn.utils.rnn.pad_sequence([entering[j] for j in batch],
                                                     batch_first=True)
            with only_top_blocks(model, k), torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=path == "cached, bf16"):
                logits = forward(handle, None, mask, inputs_embeds=states).float()
        loss, _, valid = token_losses(logits, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss[valid].mean().backward()
        opt.step()
        return int(mask.sum())

    model.train()
    rates = {path: [] for path in PATHS}
    for path in PATHS:  # warm up
        step(batches[0], path)
    for _ in range(args.repeats):
        for path in PATHS:
            t = time.perf_counter()
            for batch in batches:
                step(batch, path)
            rates[path].append((time.perf_counter() - t) / len(batches))
    per_step = {k2: statistics.median(v) for k2, v in rates.items()}
    tokens_per_step = sum(len(ids_of[j]) for b in batches for j in b) / len(batches)
    steps_per_epoch = -(-len(stream) // preset.batch_size)
    epoch = {path: per_step[path] * steps_per_epoch
             + (prefix_seconds / preset.epochs if path != "full" else 0) for path in PATHS}
    tokens_per_epoch = sum(len(ids_of[j]) for j in stream)
    result = {
        "preset": args.preset, "train_blocks": k, "batch_size": preset.batch_size,
        "max_len": preset.max_len, "unique_records": len(unique),
        "records_per_epoch": len(stream), "prefix_seconds": round(prefix_seconds, 2),
        "seconds_per_step": per_step,
        "tokens_per_second": {k2: tokens_per_step / v for k2, v in per_step.items()},
        "epoch_tokens_per_second": {k2: tokens_per_epoch / v for k2, v in epoch.items()},
        "step_speedup": {p: per_step["full"] / per_step[p] for p in PATHS[1:]},
        "epoch_speedup": {p: epoch["full"] / epoch[p] for p in PATHS[1:]},
    }
    print(f"{'path':13} {'s/step':>8} {'tok/s':>8} {'epoch tok/s':>12} {'epoch speedup':>14}")
    for path in PATHS:
        print(f"{path:13} {per_step[path]:8.3f} {result['tokens_per_second'][path]:8.0f} "
              f"{result['epoch_tokens_per_second'][path]:12.0f} "
              f"{epoch['full'] / epoch[path]:13.2f}x")
    print(f"(frozen outputs of {len(unique)} records: {prefix_seconds:.1f} s, charged to the "
          "cached paths once per training)")
    jsonio.write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
