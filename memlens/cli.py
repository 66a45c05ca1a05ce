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
    "kfac collect": "memlens kfac collect --model organisms/tiny --data organisms/tiny "
                    "--out kfac/tiny.safetensors",
    "kfac edit": "memlens kfac edit --model organisms/tiny --factors kfac/tiny.safetensors "
                 "--rho 0.9 --out organisms/tiny-edited",
    "localize": "memlens localize --model organisms/tiny --data organisms/tiny "
                "--method zero_out --budget 0.01 --out neurons.csv",
    "steer": "memlens steer --model organisms/tiny --probe probes/blocks.1.hook_resid_post "
             "--alpha 2 --dynamic --prompts prompts.txt",
    "demo": "memlens demo --out memlens-demo",
}


def _examples(*names: str) -> str:
    return "examples:\n" + "\n".join(f"  {EXAMPLES[n]}" for n in names)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="memlens", formatter_class=fmt,
        description="Locate, prove and remove memorization in transformer language models.",
        epilog="examples:\n" + "\n".join(f"  {v}" for v in EXAMPLES.values()))
    sub = p.add_subparsers(dest="command", required=True)

    org = sub.add_parser("organism", help="train or find the memorization organism",
                         formatter_class=fmt,
                         description="The organism: a small causal LM trained on a synthetic "
                                     "PII corpus with planted, duplicated canary records. "
                                     "Out: a Hugging Face model directory with corpus.jsonl "
                                     "(the ground truth) and memlens.json.",
                         epilog=_examples("organism train", "organism path"))
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    for name, help_ in (("train", "train an organism into --out (a Hugging Face model dir: "
                                  "config, safetensors, tokenizer, corpus.jsonl, memlens.json)"),
                        ("path", "print the cached organism's directory (under "
                                 "~/.cache/memlens or $MEMLENS_CACHE), training it if needed")):
        o = org_sub.add_parser(name, help=help_, description=help_, formatter_class=fmt,
                               epilog=f"example:\n  {EXAMPLES['organism ' + name]}")
        o.add_argument("--preset", default="small",
                       help="tiny (~75 s), small (~5 min, default) or tiny-deep (6 blocks)")
        o.add_argument("--arch", default="llama",
                       help="llama (default), neox, gpt2, opt (Pre-LN) or opt-postln (Post-LN)")
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

    probe = sub.add_parser("probe", help="train memorization probes", formatter_class=fmt,
                           description="Linear probes per layer and site on captured "
                                       "activations. In: a TOML config (model, data, sites). "
                                       "Out: metrics per site, a layer-sweep figure, the best "
                                       "probes (safetensors + JSON).",
                           epilog=_examples("probe train"))
    probe_sub = probe.add_subparsers(dest="probe_command", required=True)
    pt = probe_sub.add_parser(
        "train", help="label, capture and sweep probes from a TOML config",
        formatter_class=fmt,
        description="Same as python probes/train.py: writes results.json, results.parquet, "
                    "layer_sweep.html and the best probes to the config's output dir.",
        epilog=f"example:\n  {EXAMPLES['probe train']}")
    pt.add_argument("--config", required=True, type=Path, help="TOML, see probes/configs/")

    kfac = sub.add_parser("kfac", help="K-FAC curvature factors and memorization edits",
                          formatter_class=fmt,
                          description="Curvature (K-FAC) factors of linear layers, and edits "
                                      "that remove low-curvature weight components. collect: "
                                      "model + text in, a factor file out; edit: model + "
                                      "factors in, an edited model directory out.",
                          epilog=_examples("kfac collect", "kfac edit"))
    kfac_sub = kfac.add_subparsers(dest="kfac_command", required=True)
    kc = kfac_sub.add_parser(
        "collect", help="accumulate A and G factors over a token stream", formatter_class=fmt,
        description="Writes one safetensors file with A = E[a a^T] and G = E[g g^T] per layer. "
                    "Rerun the same command to resume an interrupted collection.",
        epilog=f"example:\n  {EXAMPLES['kfac collect']}")
    kc.add_argument("--model", required=True, help="model directory (or hub name)")
    kc.add_argument("--data", required=True, type=Path,
                    help="JSONL of sequences, or an organism dir (its general records)")
    kc.add_argument("--out", required=True, type=Path, help="factor file (.safetensors)")
    kc.add_argument("--roles", nargs="*", default=None,
                    help="keep only these roles (default for an organism: general)")
    kc.add_argument("--layers", nargs="+", default=["mlp"],
                    help="mlp (default), attn, or module-name globs")
    kc.add_argument("--mode", default="true", help="true (sampled labels) or empirical (gold)")
    kc.add_argument("--max-tokens", type=int, default=None)
    kc.add_argument("--max-len", type=int, default=None, help="cut sequences to this length")
    kc.add_argument("--batch-size", type=int, default=16)
    kc.add_argument("--seed", type=int, default=0)
    ke = kfac_sub.add_parser(
        "edit", help="remove low-curvature components and save the edited model",
        formatter_class=fmt,
        description="The published keep-mass edit (--rho), or a KL-budgeted edit "
                    "(--kl-budget), optionally aimed at the sequences in --memorized.",
        epilog=f"example:\n  {EXAMPLES['kfac edit']}")
    ke.add_argument("--model", required=True, help="model directory (or hub name)")
    ke.add_argument("--factors", required=True, type=Path, help="from `memlens kfac collect`")
    ke.add_argument("--out", required=True, type=Path, help="edited model directory")
    how = ke.add_mutually_exclusive_group(required=True)
    how.add_argument("--rho", nargs="+",
                     help="keep-mass for every layer (0.9), or per layer glob "
                          "('model.layers.3.*=0.6'); layers not named are left alone")
    how.add_argument("--kl-budget", type=float,
                     help="remove components until their predicted KL reaches this (nats)")
    ke.add_argument("--memorized", type=Path, default=None,
                    help="with --kl-budget: JSONL or organism dir of sequences to stop "
                         "reciting (those the model extracts exactly are used)")
    ke.add_argument("--prefix", type=int, default=32, help="prefix length for --memorized")
    ke.add_argument("--suffix", type=int, default=32, help="suffix length for --memorized")

    loc = sub.add_parser(
        "localize", help="rank MLP neurons by responsibility for memorized sequences",
        formatter_class=fmt,
        description="Scores every MLP neuron for the target sequences and writes the top "
                    "budget fraction of each layer as a ranked table (CSV or parquet).",
        epilog=f"example:\n  {EXAMPLES['localize']}")
    loc.add_argument("--model", required=True, help="model directory (or hub name)")
    loc.add_argument("--data", required=True, type=Path,
                     help="JSONL of target sequences, or an organism dir (its recited canaries)")
    loc.add_argument("--clean", type=Path, default=None,
                     help="JSONL of clean sequences (default for an organism: non-members)")
    loc.add_argument("--method", default="hard_concrete",
                     help="activations, zero_out, integrated_gradients, slimming, hard_concrete")
    loc.add_argument("--budget", type=float, default=0.01, help="fraction of neurons per layer")
    loc.add_argument("--start", type=int, default=32,
                     help="score target tokens from this index (the suffix)")
    loc.add_argument("--out", required=True, type=Path, help=".csv or .parquet")

    st = sub.add_parser(
        "steer", help="generate with and without steering away from memorization",
        formatter_class=fmt,
        description="Subtracts alpha x the probe's direction (scaled to one spread of the "
                    "states it was trained on) at the probe's site; --dynamic scales it per "
                    "token by the probe's memorization probability.",
        epilog=f"example:\n  {EXAMPLES['steer']}")
    st.add_argument("--model", required=True, help="model directory (or hub name)")
    st.add_argument("--probe", required=True, type=Path, help="a probe directory")
    st.add_argument("--alpha", required=True, type=float, help="steering strength")
    st.add_argument("--dynamic", action="store_true", help="gate per token by the probe")
    prompts = st.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    st.add_argument("--max-new-tokens", type=int, default=32)
    st.add_argument("--out", type=Path, default=None, help="write a .csv or .jsonl instead")

    demo = sub.add_parser("demo", help="run the whole pipeline on the organism; write a report",
                          formatter_class=fmt,
                          description="Trains (or reuses) the organism, then labels, captures "
                                      "and probes, edits with K-FAC, localizes and ablates "
                                      "neurons, steers, and attributes to LayerNorm. Out: "
                                      "OUT/report.html (one interactive page, works offline) "
                                      "and OUT/summary.json (each step's headline numbers). "
                                      "Steps are cached in OUT/steps: a second run takes "
                                      "seconds.",
                          epilog=f"example:\n  {EXAMPLES['demo']}")
    demo.add_argument("--out", type=Path, default=Path("memlens-demo"),
                      help="output directory (default memlens-demo)")
    demo.add_argument("--preset", default="small", help="organism preset (default small)")
    demo.add_argument("--arch", default="llama", help="organism architecture (default llama)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fresh", action="store_true", help="rerun every step, ignore the cache")
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


def _parse_rho(values: list[str]) -> float | dict[str, float]:
    if len(values) == 1 and "=" not in values[0]:
        return _float(values[0], "--rho")
    out = {}
    for v in values:
        pattern, sep, number = v.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"--rho {v!r}: give one number, or GLOB=NUMBER per layer group")
        out[pattern] = _float(number, "--rho")
    return out


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a number") from None


def _kfac(args) -> None:
    from memlens.curvature import KFACConfig, collect_factors
    from memlens.labels import manifest_roles, read_sequences
    from memlens.models import load_model

    handle = load_model(args.model)
    if args.kfac_command == "collect":
        is_organism = args.data.is_dir() or manifest_roles(args.data) is not None
        roles = tuple(args.roles) if args.roles else (("general",) if is_organism else None)
        seqs = read_sequences(args.data, handle.tokenizer, roles=roles)
        cfg = KFACConfig(layers=tuple(args.layers), mode=args.mode, max_tokens=args.max_tokens,
                         max_len=args.max_len, batch_size=args.batch_size, seed=args.seed)
        factors = collect_factors(handle, [s.token_ids for s in seqs], cfg, out=args.out)
        print(f"{factors.tokens} tokens, {len(factors.layers)} layers -> {args.out}")
        return
    _kfac_edit(handle, args)


def _kfac_edit(handle, args) -> None:
    from memlens.curvature import (
        Factors,
        apply_weights,
        budget_weights,
        eigenbasis,
        kfac_weights,
        memorization_gradient,
    )
    from memlens.edits import exact_extraction
    from memlens.labels import LabelConfig, manifest_roles, read_sequences

    rho = _parse_rho(args.rho) if args.rho else None
    if rho is not None:  # fail on a bad rho before the slow steps
        for r in rho.values() if isinstance(rho, dict) else [rho]:
            if not 0 <= r <= 1:
                raise ValueError(f"keep-mass rho must lie in [0, 1], got {r}")
    if args.memorized is not None and args.kl_budget is None:
        raise ValueError("--memorized works with --kl-budget; drop it or use --kl-budget")
    factors = Factors.load(args.factors)
    if factors.meta.get("model_hash") not in (None, handle.weights_hash()):
        print("memlens: warning: the factors were collected on other weights "
              f"({factors.meta.get('model')})", file=sys.stderr)
    basis = eigenbasis(factors)
    meta = {"factors": str(args.factors)}
    if rho is not None:
        weights = kfac_weights(handle, basis, rho)
        meta["rho"] = rho
    else:
        grads = None
        if args.memorized is not None:
            seqs = read_sequences(args.memorized, handle.tokenizer,
                                  roles=manifest_roles(args.memorized) and ("canary",))
            cfg = LabelConfig(prefix=args.prefix, suffix=args.suffix)
            recited = [s for s, hit in zip(seqs, exact_extraction(handle, seqs, cfg),
                                           strict=True) if hit]
            if not recited:
                raise ValueError(f"the model recites none of the {len(seqs)} sequences in "
                                 f"{args.memorized}; nothing to aim the edit at")
            print(f"aiming at {len(recited)} of {len(seqs)} sequences the model recites")
            grads = memorization_gradient(
                handle, [s.token_ids[:args.prefix + args.suffix] for s in recited],
                factors.layers, start=args.prefix)
            meta["memorized"] = {"path": str(args.memorized), "n_recited": len(recited)}
        weights = budget_weights(handle, basis, args.kl_budget, grads)
        meta["kl_budget"] = args.kl_budget
    edit = apply_weights(handle, weights)
    edit.save(args.out, metadata=meta)
    edit.restore()
    print(f"edited {len(weights)} layers -> {args.out}")


def _write_table(df, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    elif out.suffix == ".jsonl":
        df.to_json(out, orient="records", lines=True)
    elif out.suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        raise ValueError(f"--out {out}: use a .csv, .parquet or .jsonl file name")


def _localize(args) -> None:
    from memlens.edits import exact_extraction
    from memlens.labels import LabelConfig, manifest_roles, read_sequences
    from memlens.localize import LocalizeConfig, localize, top_neurons
    from memlens.models import load_model

    cfg = LocalizeConfig(method=args.method, start=args.start)
    if args.out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out {args.out}: use a .csv or .parquet file name")
    handle = load_model(args.model)
    organism = manifest_roles(args.data) is not None
    seqs = read_sequences(args.data, handle.tokenizer, roles=("canary",) if organism else None)
    if organism:
        hits = exact_extraction(handle, seqs, LabelConfig(prefix=args.start))
        seqs = [s for s, hit in zip(seqs, hits, strict=True) if hit]
        print(f"targets: the {len(seqs)} canaries the model recites")
    clean_path = args.clean or (args.data if organism else None)
    clean = None
    if clean_path is not None:
        clean = [s.token_ids for s in read_sequences(
            clean_path, handle.tokenizer, roles=("nonmember",) if clean_path == args.data
            else None)]
    scores = localize(handle, [s.token_ids for s in seqs], clean, cfg)
    table = top_neurons(handle, scores, args.budget)
    _write_table(table, args.out)
    print(table.head(10).to_string(index=False))
    print(f"{len(table)} neurons -> {args.out}")


def _steer(args) -> None:
    from memlens.models import load_model
    from memlens.probes import Probe
    from memlens.steering import generate_side_by_side, probe_vector, steer

    probe = Probe.load(args.probe)
    if len(probe.sites) != 1:
        raise ValueError(f"probe {probe.name!r} reads several sites; steer with a "
                         "single-site probe")
    prompts = [args.prompt] if args.prompt else [
        line for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompt (one per line)")
    handle = load_model(args.model)
    site, vector = probe.sites[0], probe_vector(probe)
    table = generate_side_by_side(
        handle, prompts,
        lambda: steer(handle, site, vector, args.alpha, probe if args.dynamic else None),
        args.max_new_tokens)
    if args.out:
        _write_table(table, args.out)
        print(f"{len(table)} prompts -> {args.out}")
        return
    for row in table.itertuples():
        print(f"prompt:  {row.prompt}\nplain:   {row.plain}\nsteered: {row.steered}\n")


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
        elif args.command == "kfac":
            _kfac(args)
        elif args.command == "localize":
            _localize(args)
        elif args.command == "steer":
            _steer(args)
        elif args.command == "demo":
            from memlens.demo import run_demo

            run_demo(args.out, preset=args.preset, arch=args.arch, seed=args.seed,
                     fresh=args.fresh)
    except (ModelLoadError, DataError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"memlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memlens: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

