"""Continued pre-training of the top blocks: the whole model per step vs the top blocks run
from the frozen blocks' output, computed once per record.

    python experiments/benchmarks/organism_training.py [--preset smollm2-cpu] [--steps 6]

Same batches of the preset's training stream, the same trained parameters and optimizer,
interleaved repeats. `step_speedup` is full / cached seconds per step; `epoch_speedup`
charges the cached path with computing every record's frozen output once (amortized over
the preset's epochs), as training does.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-cpu")
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

    def step(batch, cached):
        ids, mask = handle.pad([ids_of[j] for j in batch])
        if cached:
            states = torch.nn.utils.rnn.pad_sequence([entering[j] for j in batch],
                                                     batch_first=True)
            with only_top_blocks(model, k):
                logits = forward(handle, None, mask, inputs_embeds=states)
        else:
            logits = forward(handle, ids, mask)
        loss, _, valid = token_losses(logits, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss[valid].mean().backward()
        opt.step()
        return int(mask.sum())

    model.train()
    rates = {"full": [], "cached": []}
    step(batches[0], False), step(batches[0], True)  # warm up
    for _ in range(args.repeats):
        for name in ("full", "cached"):
            t, tokens = time.perf_counter(), 0
            for batch in batches:
                tokens += step(batch, name == "cached")
            rates[name].append((time.perf_counter() - t) / len(batches))
    per_step = {k2: statistics.median(v) for k2, v in rates.items()}
    tokens_per_step = sum(len(ids_of[j]) for b in batches for j in b) / len(batches)
    steps_per_epoch = -(-len(stream) // preset.batch_size)
    epoch = {"full": per_step["full"] * steps_per_epoch,
             "cached": per_step["cached"] * steps_per_epoch + prefix_seconds / preset.epochs}
    tokens_per_epoch = sum(len(ids_of[j]) for j in stream)
    result = {
        "preset": args.preset, "train_blocks": k, "batch_size": preset.batch_size,
        "max_len": preset.max_len, "unique_records": len(unique),
        "records_per_epoch": len(stream), "prefix_seconds": round(prefix_seconds, 2),
        "seconds_per_step": per_step,
        "tokens_per_second": {k2: tokens_per_step / v for k2, v in per_step.items()},
        "epoch_tokens_per_second": {k2: tokens_per_epoch / v for k2, v in epoch.items()},
        "step_speedup": per_step["full"] / per_step["cached"],
        "epoch_speedup": epoch["full"] / epoch["cached"],
    }
    print(f"{'path':8} {'s/step':>8} {'tok/s':>8} {'epoch tok/s':>12}")
    for name in ("full", "cached"):
        print(f"{name:8} {per_step[name]:8.3f} {result['tokens_per_second'][name]:8.0f} "
              f"{result['epoch_tokens_per_second'][name]:12.0f}")
    print(f"step speedup {result['step_speedup']:.2f}x, epoch speedup "
          f"{result['epoch_speedup']:.2f}x (frozen outputs of {len(unique)} records: "
          f"{prefix_seconds:.1f} s)")
    jsonio.write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
