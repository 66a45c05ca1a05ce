"""The ``memlens`` command line: one subcommand per step of the artifact chain.

Options that set a step's configuration are generated from its config dataclass
(:class:`~memlens.data.labels.LabelConfig`, :class:`~memlens.data.store.CaptureConfig`, ...), so
their defaults are the library's. Bad input (a :class:`~memlens.core.errors.UserError`)
prints one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

__all__ = ["COMMANDS", "DISTRIBUTED", "DTYPES", "EXAMPLES", "MODEL_HELP", "RANGES", "Number",
           "Parser", "config_from", "config_options", "load_from_args", "main", "model_options",
           "print_extraction_table"]

EXAMPLES = {
    "organism train": "memlens organism train --preset tiny --arch llama --out organisms/tiny",
    "organism path": "memlens organism path --preset small --arch llama",
    "label": "memlens label --model organisms/tiny --data organisms/tiny --out labels/tiny",
    "capture": "memlens capture --model organisms/tiny --labels labels/tiny "
               "--sites 'blocks.*.hook_resid_post' --out acts/tiny",
    "probe train": "memlens probe train --labels labels/tiny --store acts/tiny --out probes/tiny",
    "probe train config": "memlens probe train --config organism",
    "kfac collect": "memlens kfac collect --model organisms/tiny --data organisms/tiny "
                    "--out kfac/tiny.safetensors",
    "kfac edit": "memlens kfac edit --model organisms/tiny --factors kfac/tiny.safetensors "
                 "--kl-budget 0.003 --labels labels/tiny --out organisms/tiny-edited",
    "localize": "memlens localize --model organisms/tiny --labels labels/tiny "
                "--method zero_out --budget 0.01 --out neurons/tiny",
    "steer": "memlens steer --model organisms/tiny --probe probes/tiny/probes/"
             "blocks.1.hook_resid_post --alpha 4 --dynamic --save steering/tiny "
             "--prompts prompts.txt",
    "demo": "memlens demo --out memlens-demo",
    "audit": "memlens audit --model organisms/tiny --edit organisms/tiny-edited "
             "--forget organisms/tiny --forget-duplication 100 --retain organisms/tiny "
             "--out audit/tiny.json",
}


def _examples(*names: str) -> str:
    return "examples:\n" + "\n".join(f"  {EXAMPLES[n]}" for n in names)


# --------------------------------------------------------------------------- numbers


class Number:
    """An argparse type: a number of ``kind`` (int or float) checked against its range when
    the command line is read, so that a bad value stops the command before any work."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None,
                 above: float | None = None):
        self.kind, self.lo, self.hi, self.above = kind, lo, hi, above
        self.__name__ = "whole number" if kind is int else "number"  # argparse's messages

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        low = (f"> {self.above:g}" if self.above is not None else
               f">= {self.lo:g}" if self.lo is not None else None)
        if low and self.hi is not None:
            return f"{what} {low} and <= {self.hi:g}"
        return f"{what} {low}" if low else f"{what} <= {self.hi:g}" if self.hi else what

    def __call__(self, text: str):
        import math

        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        if (not math.isfinite(value) or (self.lo is not None and value < self.lo)
                or (self.above is not None and value <= self.above)
                or (self.hi is not None and value > self.hi)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {self.describe()}")
        return value


COUNT, INDEX = Number(int, lo=1), Number(int, lo=0)
POSITIVE, NONNEGATIVE, REAL = Number(float, above=0), Number(float, lo=0), Number(float)
FRACTION, UNIT = Number(float, above=0, hi=1), Number(float, lo=0, hi=1)

# The range of every numeric config field the command line sets.
RANGES = {"prefix": COUNT, "suffix": COUNT, "min_k": FRACTION, "loose_threshold": UNIT,
          "batch_size": COUNT, "max_len": COUNT, "shard_sequences": COUNT, "l2": NONNEGATIVE,
          "n_bootstrap": INDEX, "seed": INDEX, "max_tokens": COUNT, "layers_per_pass": COUNT,
          "start": INDEX, "steps": COUNT, "bits": COUNT, "group_size": COUNT,
          "relearn_steps": COUNT, "relearn_lr": POSITIVE}


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line: what is wrong, and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- config options


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def config_options(parser: argparse.ArgumentParser, cls, helps: dict[str, str]) -> None:
    """Add ``--FIELD`` for each field of dataclass ``cls`` named in ``helps``, with the
    dataclass's default (a number's range from :data:`RANGES`); :func:`config_from` builds
    the config back."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, help_ in helps.items():
        flag = "--" + name.replace("_", "-")
        if _required(fields[name]):
            parser.add_argument(flag, dest=name, required=True, nargs="+", help=help_)
            continue
        default = _field_default(fields[name])
        text = f"{help_} (default {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, default=default, help=text,
                                action=argparse.BooleanOptionalAction)
        elif isinstance(default, (tuple, list)):
            parser.add_argument(flag, dest=name, default=default, nargs="+", help=text,
                                type=RANGES.get(name, str))
        else:
            if isinstance(default, (int, float)) and name not in RANGES:
                raise TypeError(f"{flag}: a numeric option needs its range in RANGES")
            parser.add_argument(flag, dest=name, default=default, help=text,
                                type=RANGES.get(name, str))
    parser.set_defaults(**{f"_config_{cls.__name__}": (cls, tuple(helps))})


def config_from(cls, args: argparse.Namespace, **extra):
    """The ``cls`` config from the options :func:`config_options` added (plus ``extra``)."""
    _, names = getattr(args, f"_config_{cls.__name__}")
    return cls(**{n: getattr(args, n) for n in names}, **extra)


# --------------------------------------------------------------------------- parser


MODEL_HELP = "model directory, hub name, or smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_options(parser: argparse.ArgumentParser, required: bool = True,
                  help_: str = MODEL_HELP, device: bool = True) -> None:
    """``--model`` and where it runs: ``--device`` (unless the command has its own),
    ``--model-dtype``, ``--device-map``."""
    parser.add_argument("--model", required=required, help=help_)
    if device:
        parser.add_argument("--device", default="auto",
                            help="cpu, cuda, cuda:1 ... (default auto: this rank's GPU if "
                                 "there is one, else the CPU)")
    parser.add_argument("--model-dtype", default="auto", choices=DTYPES,
                        help="the weights' dtype (default auto: as saved)")
    parser.add_argument("--device-map", default=None,
                        help="'auto' spreads a model too large for one device over the GPUs "
                             "(and CPU); needs accelerate")
    parser.add_argument("--max-memory", nargs="+", default=None, metavar="DEVICE=SIZE",
                        help="with --device-map: the most each device may hold, e.g. "
                             "0=20GiB 1=20GiB cpu=60GiB")


def load_from_args(args: argparse.Namespace, name: str | None = None):
    """The model ``--model`` (or ``name``) names, placed as ``model_options`` say."""
    import torch

    from memlens.core import distributed
    from memlens.core.errors import ConfigError
    from memlens.core.model import load_model

    max_memory = None
    if args.max_memory:
        if args.device_map is None:
            raise ConfigError("--max-memory only applies with --device-map auto")
        max_memory = {}
        for item in args.max_memory:
            key, sep, size = item.partition("=")
            if not sep or not size:
                raise ConfigError(f"--max-memory {item!r}: write DEVICE=SIZE, e.g. 0=20GiB "
                                  "or cpu=60GiB")
            max_memory[int(key) if key.isdigit() else key] = size
    if args.device_map is not None and distributed.active():
        raise ConfigError("--device-map spreads one model over several devices, and under "
                          "torchrun every rank holds its own copy: use one or the other")
    dtype = None if args.model_dtype == "auto" else getattr(torch, args.model_dtype)
    return load_model(name or args.model, device=distributed.device(args.device), dtype=dtype,
                      device_map=args.device_map, max_memory=max_memory)


def _parser() -> argparse.ArgumentParser:
    from memlens.data.labels import LabelConfig
    from memlens.data.store import CaptureConfig
    from memlens.methods.audit import AuditConfig
    from memlens.methods.curvature import KFACConfig
    from memlens.methods.localize import LocalizeConfig
    from memlens.methods.probes import ProbeConfig

    fmt = argparse.RawDescriptionHelpFormatter
    p = Parser(
        prog="memlens", formatter_class=fmt,
        description="Locate, prove and remove memorization in transformer language models.",
        epilog="examples:\n" + "\n".join(f"  {v}" for v in EXAMPLES.values()))
    sub = p.add_subparsers(dest="command", required=True)

    p.add_argument("--verbose", action="store_true",
                   help="show third-party notices and Hugging Face's loading bars")

    def command(parent, name, help_, description, *examples):
        c = parent.add_parser(name, help=help_, description=description,
                              formatter_class=fmt, epilog=_examples(*examples))
        c.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)  # also after the command's name
        return c

    org = command(sub, "organism", "train or find the memorization organism",
                  "The organism: a small causal LM trained on a synthetic PII corpus with "
                  "planted, duplicated canary records. Out: a Hugging Face model directory "
                  "with corpus.jsonl (the ground truth) and memlens.json.",
                  "organism train", "organism path")
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    for name, help_ in (("train", "train an organism into --out (a Hugging Face model dir: "
                                  "config, safetensors, tokenizer, corpus.jsonl, memlens.json)"),
                        ("path", "print the cached organism's directory (under "
                                 "~/.cache/memlens or $MEMLENS_CACHE), training it if needed")):
        o = command(org_sub, name, help_, help_, f"organism {name}")
        o.add_argument("--preset", default="small",
                       help="tiny (~75 s), small (~5 min, default) or tiny-deep (6 blocks)")
        o.add_argument("--arch", default="llama",
                       help="llama (default), neox, gpt2, opt (Pre-LN) or opt-postln (Post-LN)")
        o.add_argument("--seed", type=INDEX, default=0)
        if name == "train":
            o.add_argument("--out", required=True, type=Path, help="output directory")

    lab = command(sub, "label", "label memorization per sequence and per token",
                  "Reads a model and a JSONL of sequences (an organism's corpus.jsonl or your "
                  "own: 'text' and/or 'token_ids', optional 'duplication', 'spans'). Writes "
                  "OUT/sequences.parquet, OUT/tokens.parquet and OUT/summary.json (with the "
                  "identity of the model and sequences): the labels directory every later "
                  "step reads.", "label")
    model_options(lab)
    lab.add_argument("--data", required=True, type=Path, help="JSONL file or organism directory")
    lab.add_argument("--out", required=True, type=Path, help="labels directory to write")
    lab.add_argument("--roles", nargs="*", default=None,
                     help="keep only these roles (default for an organism: canary nonmember)")
    config_options(lab, LabelConfig, {
        "prefix": "prefix tokens", "suffix": "suffix tokens",
        "min_k": "Min-K%% fraction", "loose_threshold": "loose-match similarity",
        "generate": "greedy generation for loose-match metrics",
        "batch_size": "sequences per forward pass"})

    cap = command(sub, "capture", "record activations at hook sites, streamed to disk",
                  "Runs the labeled sequences through the model and writes activations at the "
                  "named sites to a sharded, checksummed store aligned token by token with the "
                  "labels. Refuses labels made with another model. Rerun the same command to "
                  "resume an interrupted capture.", "capture")
    model_options(cap)
    source = cap.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", type=Path, help="a labels directory (memlens label)")
    source.add_argument("--data", type=Path,
                        help="or a JSONL / organism dir, captured without labels")
    cap.add_argument("--out", required=True, type=Path, help="store directory")
    config_options(cap, CaptureConfig, {
        "sites": "hook names or globs (blocks.*.hook_resid_post), or HF module paths "
                 "(model.layers.2, model.layers.2.mlp.down_proj:input)",
        "positions": "all, suffix or sample:N", "prefix": "where the suffix starts",
        "suffix": "suffix length", "dtype": "float32, float16 or bfloat16",
        "backend": "auto (bridge for hook names, torch for module paths), bridge, nnsight "
                   "or torch",
        "batch_size": "sequences per forward pass", "max_len": "cut sequences to this length",
        "shard_sequences": "sequences per shard (torchrun: ranks take shards in turn)"})

    probe = command(sub, "probe", "train memorization probes",
                    "Linear probes per layer and site on captured activations.",
                    "probe train", "probe train config")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True)
    pt = command(probe_sub, "train", "fit a probe per site from labels and a store",
                 "Reads a labels directory and the store captured from it (refused if they "
                 "describe other models or sequences) and writes OUT/results.json, "
                 "results.parquet, layer_sweep.html and OUT/probes/SITE for every site. "
                 "Without --store, captures --sites from the labels into OUT/store; without "
                 "--labels, labels --data first into OUT/labels (both need --model). Or run a "
                 "whole TOML config with --config.", "probe train", "probe train config")
    pt.add_argument("--config", type=Path,
                    help="a TOML file, or a config memlens ships (organism); alone")
    pt.add_argument("--labels", type=Path, help="labels directory (memlens label)")
    pt.add_argument("--store", type=Path, help="store captured from those labels")
    pt.add_argument("--out", type=Path, help="output directory")
    model_options(pt, required=False, help_="to label or capture what is not given",
                  device=False)
    pt.add_argument("--data", type=Path, help="JSONL or organism dir to label (no --labels)")
    pt.add_argument("--sites", nargs="+", default=["blocks.*.hook_resid_post"],
                    help="sites to capture when no --store is given")
    config_options(pt, ProbeConfig, {
        "positive": "token labels that are positives", "negative": "labels that are negatives",
        "align": "predicting (read position t - 1) or token (position t)",
        "l2": "L2 penalty", "n_bootstrap": "bootstrap resamples for the intervals",
        "seed": "split and bootstrap seed", "device": "where the torch trainer runs"})

    kfac = command(sub, "kfac", "K-FAC curvature factors and memorization edits",
                   "Curvature (K-FAC) factors of linear layers, and edits that remove "
                   "low-curvature weight components. collect: model + text in, a factor file "
                   "out; edit: model + factors (+ labels) in, an edited model directory out.",
                   "kfac collect", "kfac edit")
    kfac_sub = kfac.add_subparsers(dest="kfac_command", required=True)
    kc = command(kfac_sub, "collect", "accumulate A and G factors over a token stream",
                 "Writes one safetensors file with A = E[a a^T] and G = E[g g^T] per layer. "
                 "Rerun the same command to resume an interrupted collection.", "kfac collect")
    model_options(kc)
    kc.add_argument("--data", required=True, type=Path,
                    help="JSONL of sequences, or an organism dir (its general records)")
    kc.add_argument("--out", required=True, type=Path, help="factor file (.safetensors)")
    kc.add_argument("--roles", nargs="*", default=None,
                    help="keep only these roles (default for an organism: general)")
    config_options(kc, KFACConfig, {
        "layers": "mlp, attn, or module-name globs",
        "mode": "true (sampled labels) or empirical (gold)",
        "max_tokens": "stop after this many tokens", "batch_size": "sequences per pass",
        "max_len": "cut sequences to this length", "seed": "label sampling seed",
        "layers_per_pass": "layers whose factors one pass over the data accumulates (the "
                           "device holds only theirs)"})
    ke = command(kfac_sub, "edit", "remove low-curvature components and save the edited model",
                 "The published keep-mass edit (--rho), or a KL-budgeted edit (--kl-budget), "
                 "aimed with --labels at the sequences those labels say the model recites. "
                 "Refuses factors or labels made with another model.", "kfac edit")
    model_options(ke)
    ke.add_argument("--factors", required=True, type=Path, help="from `memlens kfac collect`")
    ke.add_argument("--out", required=True, type=Path, help="edited model directory")
    how = ke.add_mutually_exclusive_group(required=True)
    how.add_argument("--rho", nargs="+",
                     help="keep-mass for every layer (0.9), or per layer glob "
                          "('model.layers.3.*=0.6'); layers not named are left alone")
    how.add_argument("--kl-budget", type=POSITIVE,
                     help="remove components until their predicted KL reaches this (nats)")
    ke.add_argument("--labels", type=Path, default=None,
                    help="with --kl-budget: a labels directory; the edit is aimed at the "
                         "sequences they mark as recited")

    loc = command(sub, "localize", "rank MLP neurons by responsibility for memorized sequences",
                  "Scores every MLP neuron for the sequences the labels mark as recited "
                  "(non-members as clean text) and writes the top budget fraction of each "
                  "layer as a neuron ablation: OUT/neurons.parquet, OUT/scores.safetensors "
                  "and OUT/ablation.json. Apply it with NeuronAblation.load(OUT).apply(handle).",
                  "localize")
    model_options(loc)
    loc.add_argument("--labels", required=True, type=Path, help="labels directory")
    loc.add_argument("--out", required=True, type=Path, help="ablation directory to write")
    loc.add_argument("--budget", type=FRACTION, default=0.01,
                     help="fraction of neurons kept per layer (default 0.01)")
    config_options(loc, LocalizeConfig, {
        "method": "activations, zero_out, integrated_gradients, slimming, hard_concrete",
        "start": "score target tokens from this index (the suffix)",
        "steps": "integration or optimisation steps", "seed": "seed"})
    loc.add_argument("--blocks", type=INDEX, nargs="+", default=None,
                     help="score only these blocks' neurons, e.g. the blocks a fine-tune "
                          "changed (default: every block)")

    st = command(sub, "steer", "generate with and without steering away from memorization",
                 "Subtracts alpha x the probe's direction (scaled to the gap between its "
                 "classes' mean states) at the probe's site; --dynamic scales it per token by "
                 "the probe's memorization probability. --save writes the setup as a "
                 "directory; --steering replays one.", "steer")
    model_options(st)
    setup = st.add_mutually_exclusive_group(required=True)
    setup.add_argument("--probe", type=Path, help="a probe directory (memlens probe train)")
    setup.add_argument("--steering", type=Path, help="a steering directory (from --save)")
    st.add_argument("--alpha", type=REAL, help="steering strength (with --probe)")
    st.add_argument("--dynamic", action="store_true", help="gate per token by the probe")
    # dest is not "save": nnsight gives every object a .save(), argparse.Namespace included.
    st.add_argument("--save", dest="save_dir", type=Path,
                    help="write the steering setup to this directory")
    prompts = st.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    prompts.add_argument("--labels", type=Path,
                         help="or a labels directory: prompts are the prefixes of the "
                              "sequences it marks as recited, and each continuation is "
                              "checked against the true suffix")
    st.add_argument("--max-new-tokens", type=COUNT, default=32)
    st.add_argument("--out", type=Path, default=None, help="write a .csv or .jsonl instead")

    au = command(sub, "audit", "does a removal forget, or only hide? attack it and see",
                 "Scores the forget set on the model with the removal (an edited model "
                 "directory, a steering setup or a neuron ablation; none: the model as it is) "
                 "and on the unedited model: exact and loose extraction right after it, after "
                 "INT8 / INT4 weight quantization, after relearning steps on the retain set's "
                 "members (never the forget set), under perturbed prompts; membership AUROC "
                 "against the retain set's non-members; perplexity on them. Out: one JSON.",
                 "audit")
    model_options(au, help_=MODEL_HELP + " (the unedited model)")
    au.add_argument("--edit", type=Path, default=None,
                    help="an edited model directory (memlens kfac edit), a steering directory "
                         "(memlens steer --save) or a neuron ablation (memlens localize)")
    au.add_argument("--forget", required=True, type=Path,
                    help="JSONL or organism directory: the removed sequences")
    au.add_argument("--forget-duplication", type=INDEX, default=None,
                    help="keep only forget sequences with this duplication (e.g. 100)")
    au.add_argument("--retain", required=True, type=Path,
                    help="JSONL or organism directory: its members (other than the forget "
                         "set) are the relearning data, its non-members the held-out set")
    au.add_argument("--probe", type=Path, default=None,
                    help="a probe directory: report its score on the forget set")
    au.add_argument("--out", required=True, type=Path, help="a .json file to write")
    config_options(au, AuditConfig, {
        "bits": "weight quantizations (8: per channel, 4: group-wise)",
        "group_size": "INT4 group size", "relearn_steps": "score after these relearning steps",
        "relearn_lr": "relearning learning rate", "seed": "seed"})
    au.add_argument("--relearn-blocks", type=INDEX, nargs="+", default=None,
                    help="the attacker trains only these blocks, e.g. the blocks a fine-tune "
                         "changed, to save time on a large model (default: every weight)")

    demo = command(sub, "demo", "run the whole pipeline on the organism; write a report",
                   "Trains (or reuses) the organism, then runs the artifact chain on it: "
                   "label, capture, probes, K-FAC edit, localization and ablation, steering "
                   "with the saved probe, LayerNorm attribution. Out: OUT/report.html (one "
                   "interactive page, works offline), OUT/summary.json, and each step's "
                   "artifact. Steps are cached by their inputs' identities: a second run "
                   "takes seconds.", "demo")
    demo.add_argument("--out", type=Path, default=Path("memlens-demo"),
                      help="output directory (default memlens-demo)")
    demo.add_argument("--preset", default="small", help="organism preset (default small)")
    demo.add_argument("--arch", default="llama", help="organism architecture (default llama)")
    demo.add_argument("--seed", type=INDEX, default=0)
    demo.add_argument("--fresh", action="store_true", help="rerun every step, ignore the cache")
    return p


# --------------------------------------------------------------------------- commands


def _label(args) -> None:
    from memlens.data.labels import LabelConfig
    from memlens.steps.label import label_step

    cfg = config_from(LabelConfig, args)
    labels = label_step(load_from_args(args), args.data, args.out, cfg,
                        roles=tuple(args.roles) if args.roles else None)
    print_extraction_table(labels.summary)
    print(f"wrote {args.out}/summary.json")


def _capture(args) -> None:
    from memlens.data.labels import Labels, manifest_roles, read_sequences
    from memlens.data.store import CaptureConfig, capture

    cfg = config_from(CaptureConfig, args)
    handle = load_from_args(args)
    source = (Labels.load(args.labels) if args.labels else
              read_sequences(args.data, handle.tokenizer, roles=manifest_roles(args.data),
                             max_tokens=cfg.max_len))
    store = capture(handle, source, cfg, args.out)
    print(f"{store.n_rows} rows x {len(store.sites)} sites -> {args.out}")
    for site in store.sites:
        print(f"  {site}: {store.manifest['shapes'][site]}")


def _probe(args) -> None:

    from memlens.core.errors import ConfigError
    from memlens.data.labels import Labels
    from memlens.data.store import CaptureConfig
    from memlens.methods.probes import ProbeConfig
    from memlens.steps.capture import capture_step
    from memlens.steps.label import label_step
    from memlens.steps.probe import run_config, train_probes

    if args.config is not None:
        if args.labels or args.store or args.out or args.model or args.data:
            raise ConfigError("--config runs a whole TOML file; give it alone")
        summary = run_config(args.config)
    else:
        if args.out is None:
            raise ConfigError("probe train needs --out DIR (or --config FILE)")
        cfg = config_from(ProbeConfig, args)
        needs_model = args.labels is None or args.store is None
        if needs_model and args.model is None:
            raise ConfigError("without --labels and --store, probe train labels or captures "
                              "itself and needs --model (and --data without --labels)")
        handle = load_from_args(args) if needs_model else None
        if args.labels is not None:
            labels = Labels.load(args.labels)
        elif args.data is not None:
            labels = label_step(handle, args.data, args.out / "labels")
        else:
            raise ConfigError("give --labels DIR (from memlens label), or --data to label")
        store = args.store or capture_step(handle, labels, args.out / "store",
                                           CaptureConfig(sites=args.sites))
        summary = train_probes(labels, store, args.out, cfg)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))


def _parse_rho(values: list[str]) -> float | dict[str, float]:
    from memlens.core.errors import ConfigError

    def number(text):
        try:
            r = float(text)
        except ValueError:
            raise ConfigError(f"--rho {text!r} is not a number") from None
        if not 0 <= r <= 1:
            raise ConfigError(f"keep-mass rho must lie in [0, 1], got {r}")
        return r

    if len(values) == 1 and "=" not in values[0]:
        return number(values[0])
    out = {}
    for v in values:
        pattern, sep, value = v.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"--rho {v!r}: give one number, or GLOB=NUMBER per layer group")
        out[pattern] = number(value)
    return out


def _kfac(args) -> None:
    from memlens.data.labels import Labels, manifest_roles, read_sequences
    from memlens.methods.curvature import KFACConfig, collect_factors
    from memlens.steps.kfac import kfac_edit_step

    if args.kfac_command == "collect":
        cfg = config_from(KFACConfig, args)
        handle = load_from_args(args)
        organism = manifest_roles(args.data) is not None
        roles = tuple(args.roles) if args.roles else (("general",) if organism else None)
        seqs = read_sequences(args.data, handle.tokenizer, roles=roles, max_tokens=cfg.max_len)
        factors = collect_factors(handle, [s.token_ids for s in seqs], cfg, out=args.out)
        print(f"{factors.tokens} tokens, {len(factors.layers)} layers -> {args.out}")
        return
    rho = _parse_rho(args.rho) if args.rho else None
    labels = Labels.load(args.labels) if args.labels else None
    handle = load_from_args(args)
    out = kfac_edit_step(handle, args.factors, args.out, rho=rho, kl_budget=args.kl_budget,
                         labels=labels)
    print(f"edited model -> {out}")


def _write_table(df, out: Path) -> None:
    from memlens.core.errors import ConfigError

    if out.suffix not in (".parquet", ".jsonl", ".csv"):
        raise ConfigError(f"--out {out}: use a .csv, .parquet or .jsonl file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    elif out.suffix == ".jsonl":
        df.to_json(out, orient="records", lines=True)
    else:
        df.to_csv(out, index=False)


def _localize(args) -> None:
    from memlens.data.labels import Labels
    from memlens.methods.localize import LocalizeConfig, check_budget
    from memlens.steps.localize import localize_step

    cfg = config_from(LocalizeConfig, args, blocks=args.blocks)
    check_budget(args.budget)
    labels = Labels.load(args.labels)
    ablation = localize_step(load_from_args(args), labels, args.out, cfg, args.budget)
    print(ablation.table.head(10).to_string(index=False))
    print(f"{len(ablation.table)} neurons -> {args.out}")


def _steer(args) -> None:
    from memlens.core.errors import ConfigError
    from memlens.core.storage import prepare_output
    from memlens.data.labels import Labels
    from memlens.methods.probes import Probe
    from memlens.methods.steering import Steering, generate_side_by_side, recitation_side_by_side


    if args.probe is not None and args.alpha is None:
        raise ConfigError("--probe needs --alpha (the steering strength)")
    if args.steering is not None and (args.alpha is not None or args.dynamic):
        raise ConfigError("--steering replays a saved setup: its alpha and gate are fixed")
    if args.out is not None and args.out.suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"--out {args.out}: use a .csv or .jsonl file name")
    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; name a .csv or .jsonl file")
    if args.save_dir is not None:
        prepare_output(args.save_dir, "steering", marker="steering.json", allowed=("gate",))
    probe = Probe.load(args.probe) if args.probe else None
    steering = Steering.load(args.steering) if args.steering else None
    labels = Labels.load(args.labels) if args.labels else None
    if args.prompts is not None:
        prompts = [line for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{args.prompts} holds no prompt (one per line)")
    handle = load_from_args(args)
    if probe is not None:
        steering = Steering.from_probe(probe, handle, args.alpha, gated=args.dynamic)
    steering.identity.check_model(handle, "the steering setup")
    if args.save_dir:
        print(f"steering setup -> {steering.save(args.save_dir)}")
    if labels is not None:
        labels.check_model(handle)
        table = recitation_side_by_side(handle, labels.recited_targets(), labels.config.prefix,
                                        lambda: steering.apply(handle))
        print(f"recited exactly: {table['plain_exact'].sum()}/{len(table)} plain, "
              f"{table['steered_exact'].sum()}/{len(table)} steered")
    else:
        prompts = [args.prompt] if args.prompt is not None else prompts
        table = generate_side_by_side(handle, prompts, lambda: steering.apply(handle),
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
    for k in exact:
        name = "non-member" if k == "0" else k if not k.isdigit() else f"{k}x"
        lo = f"{loose[k]:7.1%}" if k in loose else "      -"
        print(f"{name:>12} {counts[k]:>5} {exact[k]:7.1%} {lo}")


def _organism(args) -> None:
    from memlens.data.organism import organism_path, train_organism

    if args.organism_command == "train":
        print(train_organism(args.out, args.preset, args.arch, args.seed))
    else:
        print(organism_path(args.preset, args.arch, args.seed))


def _demo(args) -> None:
    from memlens.steps.demo import run_demo

    run_demo(args.out, preset=args.preset, arch=args.arch, seed=args.seed, fresh=args.fresh)


def _audit(args) -> None:
    from memlens.core import jsonio
    from memlens.core.errors import ConfigError, DataError
    from memlens.core.storage import writing
    from memlens.data.labels import read_sequences
    from memlens.methods.audit import AuditConfig, AuditData, audit
    from memlens.methods.localize import NeuronAblation
    from memlens.methods.probes import Probe
    from memlens.methods.steering import Steering

    cfg = config_from(AuditConfig, args, relearn_blocks=args.relearn_blocks)
    if args.out.suffix != ".json" or args.out.is_dir():
        raise ConfigError(f"--out {args.out}: name a .json file")
    edit = args.edit
    kinds = {"memlens_edit.json": "edited model", "steering.json": "steering",
             "ablation.json": "neuron ablation"}
    kind = next((k for m, k in kinds.items() if edit and (edit / m).is_file()), None)
    if edit is not None and kind is None:
        raise ConfigError(f"--edit {edit} holds none of {sorted(kinds)}; pass an edited model "
                          "directory, a steering directory or a neuron ablation")
    probe = Probe.load(args.probe) if args.probe else None
    handle = load_from_args(args)
    forget = read_sequences(args.forget, handle.tokenizer)
    if args.forget_duplication is not None:
        forget = [s for s in forget if s.duplication == args.forget_duplication]
    if not forget:
        raise DataError(f"{args.forget} holds no sequence with duplication "
                        f"{args.forget_duplication}; check --forget-duplication")
    removed = {tuple(s.token_ids) for s in forget}
    retain = [s for s in read_sequences(args.retain, handle.tokenizer)
              if tuple(s.token_ids) not in removed]
    nonmembers = [s for s in retain if s.duplication == 0]
    data = AuditData(forget, [s.token_ids for s in retain if s.duplication != 0], nonmembers,
                     [s.token_ids for s in nonmembers])
    audited, removal = handle, None
    if kind == "edited model":
        audited = load_from_args(args, edit)
    elif kind == "steering":
        steering = Steering.load(edit)
        removal = lambda: steering.apply(handle)  # noqa: E731
    elif kind == "neuron ablation":
        ablation = NeuronAblation.load(edit)
        removal = lambda: ablation.apply(handle)  # noqa: E731
    report = {"model": handle.name, "edit": str(edit) if edit else None, "kind": kind,
              "forget": {"n": len(forget), "source": str(args.forget),
                         "duplication": args.forget_duplication},
              "config": dataclasses.asdict(cfg)}
    if edit is not None:
        print("auditing the unedited model ...", flush=True)
        report["unedited"] = audit(handle, None, data, cfg, probe=probe)
    print(f"auditing {kind or 'the model'} ...", flush=True)
    report["audited"] = audit(audited, removal, data, cfg, probe=probe)
    with writing(args.out):
        jsonio.write(args.out, report)
    for name in ("unedited", "audited"):
        if name in report:
            r = report[name]
            cells = [f"{k} {r[k]['exact']:.0%}" for k in ("after_edit", "int8", "int4")
                     if k in r]
            cells += [f"relearn {k} {v['exact']:.0%}" for k, v in r["relearn"].items()]
            print(f"{name:9} exact extraction: " + ", ".join(cells)
                  + f"; loss AUROC {r['mia_auroc']['loss']:.2f}")
    print(f"wrote {args.out}")


COMMANDS = {"organism": _organism, "label": _label, "capture": _capture, "probe": _probe,
            "kfac": _kfac, "localize": _localize, "steer": _steer, "demo": _demo,
            "audit": _audit}


def main(argv: list[str] | None = None) -> int:
    from memlens.core import distributed
    from memlens.core.errors import UserError
    from memlens.core.storage import disk_error

    if "--verbose" in (sys.argv[1:] if argv is None else argv):
        from memlens.core import logs

        logs.verbose()
    else:  # read when Hugging Face's libraries are first imported (building the parser)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = _parser().parse_args(argv)
    try:
        if distributed.init():
            _check_distributed(args)
        COMMANDS[args.command](args)
    except UserError as exc:
        print(f"memlens: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = disk_error(exc)
        if reason is None:
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"memlens: error: {reason}{where}; free space or choose another output, then "
              "rerun the same command", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memlens: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


# Commands that shard their work over torchrun's ranks (the others run in one process).
DISTRIBUTED = ("label", "capture", "kfac collect", "localize")


def _check_distributed(args) -> None:
    """Under torchrun: refuse commands that do not shard; let rank 0 alone print."""
    from memlens.core import distributed
    from memlens.core.errors import ConfigError

    name = " ".join(filter(None, (args.command, getattr(args, "kfac_command", None))))
    if name not in DISTRIBUTED:
        raise ConfigError(f"memlens {name} runs in one process; run it without torchrun "
                          f"(torchrun runs: {', '.join(DISTRIBUTED)})")
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)


if __name__ == "__main__":
    sys.exit(main())
