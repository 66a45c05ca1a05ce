"""The chain: steps run in order on one model and its data, each reading the artifacts of
the steps before it and writing its own under OUT (``labels/``, ``activations/``,
``probes/``, ``kfac/factors.safetensors``, ``neurons/``, ``steering/``).

A step of the chain is a module of ``memlens.steps`` with ``NAME``, ``TITLE``, ``TEXT``,
``AFTER`` (the steps whose results it reads), ``SETTINGS`` (the :class:`RunConfig` fields
it reads besides ``labels``), ``report(chain, section) -> dict`` (runs the
step's method, fills its section of the report, returns its headline numbers) and
optionally ``needs(chain) -> str | None`` (why it cannot run on this data and what to add,
or None). :func:`run_steps` caches each step's numbers and section in
``OUT/steps/NAME.json``, keyed by the model's weights hash, the data, the settings it
reads and the identities of the steps it reads: a second run reuses every step whose key
still matches (an interrupted run resumes at the step it was in).

The data's :class:`~memlens.data.splits.Splits` keep scores honest: probes, directions,
edits and every setting come from the calibration half of the records, every before/after
score from the evaluation half.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from memlens.core import jsonio
from memlens.core.config import (
    COUNT,
    FRACTION,
    INDEX,
    POSITIVE,
    Config,
    nested,
    option,
    to_json,
)
from memlens.core.errors import DataError
from memlens.core.identity import Identity
from memlens.core.metrics import (
    Extraction,
    bootstrap_ci,
    edit_metrics,
    exact_extraction,
    perplexity,
)
from memlens.core.model import ModelHandle, ModelOptions
from memlens.core.sequences import Sequence
from memlens.core.version import VERSION
from memlens.data.labels import LabelConfig, Labels
from memlens.data.splits import Splits
from memlens.methods.localize import METHODS
from memlens.methods.unlearn import METHODS as UNLEARNING
from memlens.report.page import Section

__all__ = ["Chain", "Measure", "RunConfig", "run_steps", "skip"]


@dataclass
class RunConfig(Config):
    """How the chain chooses and scores: the utility budget and target every setting is
    chosen under (on the calibration half), and the grids it chooses from. All are part of
    the step cache keys."""

    max_ppl_increase: float = option(0.05, "the utility budget: the largest rise in held-out "
                                     "perplexity a chosen setting may cost (0.05 = 5%)",
                                     POSITIVE)
    target_removal: float = option(0.9, "the share of the calibration half's recited "
                                   "sequences a setting must stop reciting; the weakest "
                                   "setting that does so within the budget is chosen",
                                   FRACTION)
    probe_sites: str = option("blocks.*.hook_resid_post", "sites the probes read")
    kfac_tokens: int = option(30_000, "tokens the K-FAC factors are collected over", COUNT)
    kfac_budgets: tuple[float, ...] = option((1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                                             "predicted-KL budgets of the aimed K-FAC edit "
                                             "to choose from", POSITIVE)
    kfac_compare: tuple[float, ...] = option((0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8),
                                             "keep-mass (of curvature mass for the published "
                                             "edit, of squared singular values for SVD) the "
                                             "comparison edits choose from; none: no "
                                             "comparison", FRACTION)
    localize_method: str = option("attribution_patching", "how neurons are scored "
                                  "(attribution_patching: one backward pass for every "
                                  "block; zero_out: a forward pass per neuron)",
                                  choices=METHODS)
    localize_neurons: tuple[int, ...] = option((1, 2, 4, 8, 16, 32, 64, 128, 256),
                                               "how many of the top-scoring MLP neurons "
                                               "(wherever they are) to ablate, to choose from",
                                               COUNT)
    localize_per_block: tuple[int, ...] = option((1, 2, 4, 8, 16), "or how many of each "
                                                 "block's top neurons, to choose from", COUNT)
    localize_targets: int = option(16, "recited sequences the neurons are scored for", COUNT)
    steer_sites: int = option(2, "probe sites (the best on the calibration half's validation "
                              "tokens) steering is tried at", COUNT)
    steer_alphas: tuple[float, ...] = option((0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0),
                                             "steering strengths to choose from", POSITIVE)
    norm_strengths: tuple[float, ...] = option((0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.3, 1.0),
                                               "how far the removed norms' parameters are "
                                               "moved to gain 1 and bias 0, to choose from",
                                               FRACTION)
    attribution_tokens: int = option(200, "tokens per LayerNorm attribution set", COUNT)
    unlearn_methods: tuple[str, ...] = option(tuple(UNLEARNING), "unlearning baselines "
                                              "(and loss-matched forgetting) the audit sets "
                                              "beside memlens' removals",
                                              choices=tuple(UNLEARNING))
    unlearn_steps: tuple[int, ...] = option((5, 10, 20, 40, 80), "unlearning steps to "
                                            "choose from", COUNT)
    unlearn_lrs: tuple[float, ...] = option((3e-4, 1e-3), "unlearning learning rates to "
                                            "choose from", POSITIVE)
    audit_relearn_steps: tuple[int, ...] = option((10, 50), "relearning steps the audit "
                                                  "scores after", COUNT)
    audit_relearn_blocks: tuple[int, ...] | None = option(None, "the blocks the audit's "
                                                          "relearning attack trains, e.g. the "
                                                          "blocks a fine-tune changed (default: "
                                                          "an organism's trained blocks, else "
                                                          "every weight)", INDEX)
    retrain: bool = option(True, "on an organism without --reference, train it again "
                           "without the forget set for the audit (minutes on the small one)")
    labels: LabelConfig = nested(LabelConfig, skip=("generate", "short"))


@dataclass
class Measure:
    """What a setting does to one half: per recited record (recited by the unedited model),
    whether it is still recited; and the perplexity of the half's clean text."""

    ids: list[str]
    duplication: list[int | None]
    exact: list[bool]
    perplexity: float

    @property
    def removed(self) -> float:
        """The share of the recited records no longer recited."""
        return 1 - sum(self.exact) / len(self.exact) if self.exact else 0.0

    def removed_by_duplication(self) -> dict[str, dict]:
        """Per duplication count (where known): the share of its recited records no longer
        recited, with a 95% bootstrap interval, and how many there were."""
        out = {}
        for dup in sorted({d for d in self.duplication if d is not None}):
            gone = [not e for e, d in zip(self.exact, self.duplication, strict=True)
                    if d == dup]
            out[str(dup)] = {"removed": sum(gone) / len(gone), "ci": list(bootstrap_ci(gone)),
                             "n": len(gone)}
        return out


def skip(sec: Section, what: str, add: str) -> str:
    """Note in ``sec`` that ``what`` was skipped and what to add to the data; returns the
    note."""
    note = f"{what} skipped: {add}."
    sec.html(f"<p class='skipped'><b>Skipped.</b> {html.escape(note)}</p>")
    return note


class Chain:
    """Shared state of one run: the model and data, the halves, the artifacts' places, the
    scores before any removal."""

    def __init__(self, out: Path, model: str | Path, data: str | Path, config: RunConfig,
                 reference: str | Path | None = None, options: ModelOptions | None = None,
                 progress: bool = True):
        self.out, self.config, self.progress = Path(out), config, progress
        self.model_name, self.data, self.reference = str(model), Path(data), reference
        self.options = options or ModelOptions()
        self.cfg = config.labels
        self.labels_dir = self.out / "labels"
        self.store_dir = self.out / "activations"
        self.probes_dir = self.out / "probes"
        self.factors_path = self.out / "kfac" / "factors.safetensors"
        self.neurons_dir = self.out / "neurons"
        self.steering_dir = self.out / "steering"
        self.unlearn_dir = self.out / "unlearn"
        self._recited: dict[str, list[Sequence]] = {}

    @cached_property
    def handle(self) -> ModelHandle:
        return self.options.load(self.model_name)

    @cached_property
    def organism(self) -> dict | None:
        """The organism's manifest when the model is a memlens organism, else None."""
        meta = Path(self.handle.name) / "memlens.json"
        if not meta.is_file():
            return None
        org = json.loads(meta.read_text())
        return org if "preset" in org else None

    @cached_property
    def trained_blocks(self) -> tuple[int, ...] | None:
        """The blocks an organism continued from a pretrained model trained (its memory can
        live only there); None: every block."""
        top = (self.organism or {}).get("preset_config", {}).get("train_blocks")
        n = self.handle.n_layers
        return tuple(range(n - top, n)) if top else None

    @cached_property
    def splits(self) -> Splits:
        splits = Splits.from_data(self.data, self.handle.tokenizer,
                                  max_tokens=self.cfg.prefix + self.cfg.suffix)
        if not splits.calibration or not splits.evaluation:
            raise DataError(f"{self.data} holds {len(splits.canaries)} member record(s): "
                            "memlens run splits them into a calibration and an evaluation "
                            "half, so give at least 2 (dozens for rates worth reading)")
        return splits

    @cached_property
    def data_hash(self) -> str:
        path = self.data / "corpus.jsonl" if self.data.is_dir() else self.data
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    @cached_property
    def model_hash(self) -> str:
        return self.handle.weights_hash()

    @property
    def labels(self) -> Labels:
        return Labels.load(self.labels_dir)

    @cached_property
    def counts(self) -> bool:
        """Whether the members' duplication counts are known."""
        return any(s.duplication is not None for s in self.splits.canaries)

    def recited(self, half: str) -> list[Sequence]:
        """Members of ``half`` the unedited model recites exactly (from the labels)."""
        if half not in self._recited:
            exact = dict(zip(self.labels.sequences["id"].astype(str),
                             self.labels.sequences["exact"], strict=True))
            self._recited[half] = [s for s in getattr(self.splits, half) if exact.get(s.id)]
        return self._recited[half]

    def clean(self, half: str) -> tuple[list[Sequence], str]:
        """Clean text of ``half`` for perplexity and what it is: held-out prose or
        non-members where the data has them, else the half's members the model does not
        recite."""
        seqs, what = self.splits.clean(half)
        if seqs:
            return seqs, what
        recited = {s.id for s in self.recited(half)}
        rest = [s for s in getattr(self.splits, half) if s.id not in recited]
        if not rest:
            raise DataError(f"the {half} half of {self.data} has no clean text for perplexity: "
                            "the model recites every record of it and the data has no "
                            "non-members; add held-out records marked 'duplication': 0")
        return rest, "records the model does not recite (the data has no held-out text)"

    def clean_ids(self, half: str) -> list[list[int]]:
        """The token ids of :meth:`clean`."""
        return [s.token_ids for s in self.clean(half)[0]]

    def measure(self, half: str) -> Measure:
        """:class:`Measure` of ``half`` under the model as it is now (removals applied)."""
        seqs = self.recited(half)
        exact = exact_extraction(self.handle, seqs, self.cfg) if seqs else []
        return Measure([s.id for s in seqs], [s.duplication for s in seqs], exact,
                       perplexity(self.handle, self.clean_ids(half), self.cfg.batch_size))

    @property
    def summary(self) -> dict:
        """The labels step's numbers (its cached summary)."""
        return self.step_result("labels")

    def step_result(self, name: str) -> dict:
        return json.loads((self.out / "steps" / f"{name}.json").read_text())["summary"]

    @cached_property
    def before(self) -> Extraction:
        """Extraction of the evaluation half before any removal, as the labels step
        recorded it."""
        return Extraction.from_json(self.summary["before"])

    def before_perplexity(self, half: str) -> float:
        return self.summary["perplexity_before"][half]

    def probe_path(self, site: str) -> Path:
        return self.probes_dir / "probes" / site

    def after(self, loose: bool = True) -> Extraction:
        """Extraction of the evaluation half's members by duplication, and the evaluation
        half's clean perplexity, under the model as it is now."""
        return edit_metrics(self.handle, self.splits.evaluation, self.clean_ids("evaluation"),
                            self.cfg, loose=loose)

    def inputs(self, after: tuple[str, ...]) -> dict[str, str]:
        """Digests of the cached steps a step reads."""
        out = {}
        for name in after:
            path = self.out / "steps" / f"{name}.json"
            if path.is_file():
                cached = json.loads(path.read_text())
                out[name] = Identity.from_json(cached.get("identity"), str(path)).digest
        return out

    def identity(self, step) -> Identity:
        """What a cached step was computed from: the model, the data, the settings and the
        steps it reads."""
        every = to_json(self.config)
        settings = {k: every[k] for k in ("labels", *getattr(step, "SETTINGS", every))}
        if step.NAME == "audit":
            settings["reference"] = str(self.reference) if self.reference else None
        return Identity(f"chain step {step.NAME}", self.model_hash, self.data_hash, settings,
                        self.inputs(getattr(step, "AFTER", ())), self.model_name, VERSION)


def run_steps(chain: Chain, steps: list, fresh: bool = False) -> tuple[dict, list[Section],
                                                                       list[str]]:
    """Run (or reuse) each step module in order: (each step's numbers and the seconds it
    took when computed, the report sections, the steps reused from the cache). A step whose
    ``needs`` names something the data lacks is reported as skipped."""
    summary, sections, reused = {}, [], []
    (chain.out / "steps").mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(steps, 1):
        name = step.NAME
        cache = chain.out / "steps" / f"{name}.json"
        missing = next((s for s in getattr(step, "AFTER", ()) if summary.get(s, ({},))[0]
                        .get("skipped")), None)
        reason = (f"it reads the {missing} step, which was skipped" if missing
                  else step.needs(chain) if hasattr(step, "needs") else None)
        if reason:
            print(f"[{i}/{len(steps)}] {name}: skipped ({reason})", flush=True)
            sec = Section(step.TITLE, step.TEXT)
            note = skip(sec, f"The {name} step", reason)
            cache.unlink(missing_ok=True)
            sections.append(sec)
            summary[name] = ({"skipped": note}, 0.0)
            continue
        want = chain.identity(step)
        cached = json.loads(cache.read_text()) if cache.exists() and not fresh else None
        changed = None
        if cached:  # a cache from before identity headers counts as changed
            changed = (want.differences(Identity.from_json(cached["identity"], str(cache)))
                       if "identity" in cached else ["cache format"])
        t = time.perf_counter()
        if cached and not changed:
            print(f"[{i}/{len(steps)}] {name}: cached (computed in {cached['seconds']:.0f} s)",
                  flush=True)
            sec = Section(**cached["section"])
            reused.append(name)
        else:
            why = f" (changed since the cached run: {', '.join(changed)})" if changed else ""
            print(f"[{i}/{len(steps)}] {name} ...{why}", flush=True)
            sec = Section(step.TITLE, step.TEXT)
            result = step.report(chain, sec)
            cached = {"identity": want.to_json(), "summary": result, "section": asdict(sec),
                      "seconds": round(time.perf_counter() - t, 1)}
            cache.write_text(jsonio.dumps(cached))
            print(f"    {cached['seconds']:.0f} s", flush=True)
        sections.append(sec)
        summary[name] = (cached["summary"], cached["seconds"])
    return summary, sections, reused
