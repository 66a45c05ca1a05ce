"""Steer step: a model and a probe (or a saved steering setup) -> generations with and
without steering away from memorization, and optionally the setup saved as a directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import COUNT, REAL, Config, nested, option
from memlens.core.errors import ConfigError
from memlens.core.model import ModelOptions
from memlens.core.storage import prepare_output
from memlens.data.labels import Labels
from memlens.methods.probes import Probe
from memlens.methods.steering import Steering, generate_side_by_side, recitation_side_by_side
from memlens.report.page import Section
from memlens.steps.calibrate import choose, evaluate, needs_recited
from memlens.steps.chain import Chain

__all__ = ["AFTER", "NAME", "SETTINGS", "TEXT", "TITLE", "SteerCommand", "main", "needs", "removal",
           "report", "write_table"]


@dataclass(kw_only=True)
class SteerCommand(Config):
    """generate with and without steering away from memorization

    Subtracts alpha x the probe's direction (scaled to the gap between its classes' mean
    states) at the probe's site; --dynamic scales it per token by the probe's memorization
    probability. --save writes the setup as a directory; --steering replays one.
    """

    EXAMPLE: ClassVar[str] = ("memlens steer --model organisms/tiny --probe probes/tiny/"
                              "probes/blocks.1.hook_resid_post --alpha 4 --dynamic --save "
                              "steering/tiny --prompts prompts.txt")

    model: ModelOptions = nested(ModelOptions)
    probe: Path | None = option(None, "a probe directory (memlens probe train)")
    steering: Path | None = option(None, "or a steering directory (from --save)")
    alpha: float | None = option(None, "steering strength (with --probe)", REAL)
    dynamic: bool = option(False, "gate per token by the probe")
    # Not "save": nnsight gives every object a .save(), argparse.Namespace included.
    save_dir: Path | None = option(None, "write the steering setup to this directory",
                                   flag="--save")
    prompt: str | None = option(None, "one prompt")
    prompts: Path | None = option(None, "or a text file, one prompt per line")
    labels: Path | None = option(None, "or a labels directory: prompts are the prefixes of "
                                 "the sequences it marks as recited, and each continuation is "
                                 "checked against the true suffix")
    max_new_tokens: int = option(32, "tokens generated per prompt", COUNT)
    out: Path | None = option(None, "write a .csv or .jsonl instead")

    def __post_init__(self):
        super().__post_init__()
        if (self.probe is None) == (self.steering is None):
            raise ConfigError("give --probe DIR (with --alpha) or --steering DIR, one of the "
                              "two")
        if sum(x is not None for x in (self.prompt, self.prompts, self.labels)) != 1:
            raise ConfigError("give one of --prompt TEXT, --prompts FILE or --labels DIR")
        if self.probe is not None and self.alpha is None:
            raise ConfigError("--probe needs --alpha (the steering strength)")
        if self.steering is not None and (self.alpha is not None or self.dynamic):
            raise ConfigError("--steering replays a saved setup: its alpha and gate are fixed")
        if self.out is not None and self.out.suffix not in (".csv", ".jsonl"):
            raise ConfigError(f"--out {self.out}: use a .csv or .jsonl file name")
        if self.out is not None and self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a directory; name a .csv or .jsonl file")


def main(cmd: SteerCommand) -> None:
    if cmd.save_dir is not None:
        prepare_output(cmd.save_dir, "steering", marker="steering.json", allowed=("gate",))
    probe = Probe.load(cmd.probe) if cmd.probe else None
    steering = Steering.load(cmd.steering) if cmd.steering else None
    labels = Labels.load(cmd.labels) if cmd.labels else None
    prompts = [cmd.prompt]
    if cmd.prompts is not None:
        prompts = [line for line in cmd.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{cmd.prompts} holds no prompt (one per line)")
    handle = cmd.model.load()
    if probe is not None:
        steering = Steering.from_probe(probe, handle, cmd.alpha, gated=cmd.dynamic)
    steering.identity.check_model(handle, "the steering setup")
    if cmd.save_dir:
        print(f"steering setup -> {steering.save(cmd.save_dir)}")
    if labels is not None:
        labels.check_model(handle)
        table = recitation_side_by_side(handle, labels.recited_targets(), labels.config.prefix,
                                        lambda: steering.apply(handle))
        print(f"recited exactly: {table['plain_exact'].sum()}/{len(table)} plain, "
              f"{table['steered_exact'].sum()}/{len(table)} steered")
    else:
        table = generate_side_by_side(handle, prompts, lambda: steering.apply(handle),
                                      cmd.max_new_tokens)
    if cmd.out:
        write_table(table, cmd.out)
        print(f"{len(table)} prompts -> {cmd.out}")
        return
    for row in table.itertuples():
        print(f"prompt:  {row.prompt}\nplain:   {row.plain}\nsteered: {row.steered}\n")


def write_table(df, out: Path) -> None:
    """A table to .csv, .parquet or .jsonl by ``out``'s suffix."""
    if out.suffix not in (".parquet", ".jsonl", ".csv"):
        raise ConfigError(f"--out {out}: use a .csv, .parquet or .jsonl file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    elif out.suffix == ".jsonl":
        df.to_json(out, orient="records", lines=True)
    else:
        df.to_csv(out, index=False)


# --------------------------------------------------------------------------- in the chain

NAME = "steering"
TITLE = "5. Steering during generation"
TEXT = ("A probe's direction at one site is subtracted from the residual stream while the "
        "model generates: everywhere (static), or per token where the probe sees "
        "memorization (probe-gated). The site (among the probes best on the calibration "
        "half's validation tokens), the gating and the strength are chosen on the "
        "calibration half and scored on the evaluation half.")
AFTER = ("labels", "probes")
SETTINGS = ("max_ppl_increase", "target_removal", "steer_sites", "steer_alphas")


def needs(d: Chain) -> str | None:
    return needs_recited(d)


def removal(d: Chain) -> Steering | None:
    """The chosen steering (for the audit)."""
    chosen = d.step_result(NAME)["chosen"]["params"]
    return None if chosen is None else Steering.load(d.steering_dir)


def report(d: Chain, sec: Section) -> dict:
    sites = d.step_result("probes")["sites_by_validation_auroc"][:d.config.steer_sites]
    probes = {site: Probe.load(d.probe_path(site)) for site in sites}
    families = {f"{'probe-gated' if gated else 'static'} at {site}": [
        {"label": f"alpha {a:g}", "site": site, "gated": gated, "alpha": a}
        for a in sorted(d.config.steer_alphas)] for site in sites for gated in (True, False)}

    def setup(params) -> Steering:
        return Steering.from_probe(probes[params["site"]], d.handle, params["alpha"],
                                   gated=params["gated"])

    def apply(params):
        return setup(params).apply(d.handle)

    choice = choose(d, families, apply)
    headline = evaluate(d, apply, choice, "Steering", sec)
    if choice.params is not None:
        steering = setup(choice.params)
        steering.save(d.steering_dir)
        prompts = [q.token_ids[:d.cfg.prefix] for q in d.recited("evaluation")][:3]
        sec.table(generate_side_by_side(d.handle, prompts, lambda: steering.apply(d.handle)))
        headline |= {k: choice.params[k] for k in ("site", "gated", "alpha")}
    return {**headline, "sites_tried": sites}
