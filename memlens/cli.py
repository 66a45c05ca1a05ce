"""The ``memlens`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = {
    "organism train": "memlens organism train --preset tiny --arch llama --out organisms/tiny",
    "organism path": "memlens organism path --preset small --arch llama",
    "label": "memlens label --model organisms/tiny --data organisms/tiny/corpus.jsonl "
             "--out labels/tiny --prefix 32 --suffix 32",
    "capture": "memlens capture --model organisms/tiny --data labels/tiny "
               "--sites 'blocks.*.hook_resid_post' --out acts/tiny --positions suffix",
    "probe train": "memlens probe train --config probes/configs/organism.toml",
    "demo": "memlens demo --out memlens-demo",
}


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="memlens", formatter_class=fmt,
        description="Locate, prove and remove memorization in transformer language models.",
        epilog="examples:\n" + "\n".join(f"  {v}" for v in EXAMPLES.values()))
    sub = p.add_subparsers(dest="command", required=True)

    org = sub.add_parser("organism", help="train or find the memorization organism",
                         description="The organism: a small causal LM trained on a synthetic "
                                     "PII corpus with planted, duplicated canary records.")
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    for name, help_ in (("train", "train an organism into --out (a Hugging Face model dir)"),
                        ("path", "print the cached organism's directory, training it if needed")):
        o = org_sub.add_parser(name, help=help_, description=help_, formatter_class=fmt,
                               epilog=f"example:\n  {EXAMPLES['organism ' + name]}")
        o.add_argument("--preset", default="small", help="tiny (~75 s) or small (~5 min)")
        o.add_argument("--arch", default="llama", help="llama, neox or gpt2")
        o.add_argument("--seed", type=int, default=0)
        if name == "train":
            o.add_argument("--out", required=True, type=Path,
                           help="output directory: config, safetensors, tokenizer, "
                                "corpus.jsonl (ground truth), memlens.json")

    lab = sub.add_parser(
        "label", help="label memorization per sequence and per token", formatter_class=fmt,
        description="Reads a model directory and a JSONL of sequences (an organism's "
                    "corpus.jsonl or your own: 'text' and/or 'token_ids', optional "
                    "'duplication', 'spans'). Writes OUT/sequences.parquet, OUT/tokens.parquet "
                    "and OUT/summary.json.",
        epilog=f"example:\n  {EXAMPLES['label']}")
    lab.add_argument("--model", required=True, help="model directory (or hub name)")
    lab.add_argument("--data", required=True, type=Path, help="JSONL file or organism directory")
    lab.add_argument("--out", required=True, type=Path, help="output directory")
    lab.add_argument("--prefix", type=int, default=32, help="prefix tokens (default 32)")
    lab.add_argument("--suffix", type=int, default=32, help="suffix tokens (default 32)")
    lab.add_argument("--min-k", type=float, default=0.2, help="Min-K%% fraction (default 0.2)")
    lab.add_argument("--roles", nargs="*", default=None,
                     help="keep only these roles (default for an organism: canary nonmember)")
    lab.add_argument("--no-generate", action="store_true",
                     help="skip greedy generation (no loose-match metrics)")
    lab.add_argument("--batch-size", type=int, default=32)

    cap = sub.add_parser(
        "capture", help="record activations at hook sites, streamed to disk",
        formatter_class=fmt,
        description="Runs sequences through the model and writes activations at the named "
                    "sites to a sharded, checksummed store aligned token by token with the "
                    "labels. Rerun the same command to resume an interrupted capture.",
        epilog=f"example:\n  {EXAMPLES['capture']}")
    cap.add_argument("--model", required=True, help="model directory (or hub name)")
    cap.add_argument("--data", required=True, type=Path,
                     help="a labels directory (memlens label), a JSONL, or an organism dir")
    cap.add_argument("--sites", required=True, nargs="+",
                     help="hook names or globs (blocks.*.hook_resid_post), or HF module "
                          "paths (model.layers.2, model.layers.2.mlp.down_proj:input)")
    cap.add_argument("--out", required=True, type=Path, help="store directory")
    cap.add_argument("--positions", default="all", help="all, suffix or sample:N")
    cap.add_argument("--prefix", type=int, default=32, help="where the suffix starts")
    cap.add_argument("--suffix", type=int, default=32, help="suffix length")
    cap.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    cap.add_argument("--backend", default="auto",
                     help="auto (default: bridge for hook names, torch for module paths), "
                          "bridge, nnsight or torch")
    cap.add_argument("--batch-size", type=int, default=32)

    probe = sub.add_parser("probe", help="train memorization probes",
                           description="Linear probes per layer and site on captured "
                                       "activations.")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True)
    pt = probe_sub.add_parser(
        "train", help="label, capture and sweep probes from a TOML config",
        formatter_class=fmt,
        description="Same as python probes/train.py: writes results.json, results.parquet, "
                    "layer_sweep.html and the best probes to the config's output dir.",
        epilog=f"example:\n  {EXAMPLES['probe train']}")
    pt.add_argument("--config", required=True, type=Path, help="TOML, see probes/configs/")

    demo = sub.add_parser("demo", help="run the pipeline on the embedded organism",
                          formatter_class=fmt,
                          description="Trains (or reuses) the organism, labels it and prints "
                                      "extraction by duplication count.",
                          epilog=f"example:\n  {EXAMPLES['demo']}")
    demo.add_argument("--out", type=Path, default=Path("memlens-demo"))
    demo.add_argument("--preset", default="small")
    demo.add_argument("--arch", default="llama")
    demo.add_argument("--seed", type=int, default=0)
    return p


def _label(args) -> dict:
    from memlens.labels import LabelConfig, label, manifest_roles, read_sequences
    from memlens.models import load_model

    handle = load_model(args.model)
    roles = tuple(args.roles) if args.roles else manifest_roles(args.data)
    seqs = read_sequences(args.data, handle.tokenizer, roles=roles)
    cfg = LabelConfig(prefix=args.prefix, suffix=args.suffix, min_k=args.min_k,
                      generate=not args.no_generate, batch_size=args.batch_size)
    result = label(handle, seqs, cfg)
    result.save(args.out)
    return result.summary


def _capture(args):
    from memlens.capture import CaptureConfig, capture
    from memlens.labels import manifest_roles, read_labels, read_sequences
    from memlens.models import load_model

    handle = load_model(args.model)
    token_labels = None
    if (args.data / "sequences.parquet").exists():
        seqs, token_labels = read_labels(args.data)
    else:
        seqs = read_sequences(args.data, handle.tokenizer, roles=manifest_roles(args.data))
    cfg = CaptureConfig(sites=args.sites, positions=args.positions, prefix=args.prefix,
                        suffix=args.suffix, dtype=args.dtype, backend=args.backend,
                        batch_size=args.batch_size)
    store = capture(handle, seqs, cfg, args.out, token_labels=token_labels)
    print(f"{store.n_rows} rows x {len(store.sites)} sites -> {args.out}")
    for site in store.sites:
        print(f"  {site}: {store.manifest['shapes'][site]}")


def print_extraction_table(summary: dict) -> None:
    exact = summary["exact_extraction_rate_by_duplication"]
    loose = summary.get("loose_extraction_rate_by_duplication", {})
    counts = summary["n_by_duplication"]
    print(f"{'duplication':>12} {'n':>5} {'exact':>7} {'loose':>7}")
    for k in sorted(exact, key=int):
        name = "non-member" if k == "0" else f"{k}x"
        lo = f"{loose[k]:7.1%}" if k in loose else "      -"
        print(f"{name:>12} {counts[k]:>5} {exact[k]:7.1%} {lo}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from memlens.labels import DataError
    from memlens.models import ModelLoadError

    try:
        if args.command == "organism":
            from memlens.organism import organism_path, train_organism

            if args.organism_command == "train":
                out = train_organism(args.out, args.preset, args.arch, args.seed)
            else:
                out = organism_path(args.preset, args.arch, args.seed)
            print(out)
        elif args.command == "label":
            summary = _label(args)
            print_extraction_table(summary)
            print(f"wrote {args.out}/summary.json")
        elif args.command == "capture":
            _capture(args)
        elif args.command == "probe":
            import json

            from memlens.probes import train_from_config

            summary = train_from_config(args.config)
            print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)},
                             indent=2))
        elif args.command == "demo":
            from memlens.demo import run_demo

            run_demo(args.out, preset=args.preset, arch=args.arch, seed=args.seed)
    except (ModelLoadError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"memlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memlens: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

