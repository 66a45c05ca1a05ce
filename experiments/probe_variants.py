"""What a memorization probe needs on a real model: variants of the probe, each chosen on the
calibration half and scored on the evaluation half of a ``memlens run``.

    python experiments/probe_variants.py RUN_DIR [--out FILE.json]

RUN_DIR is a ``memlens run`` output (its labels, its activation store of residual streams,
its summary's halves). Every variant is a logistic regression on standardized features
(its L2 strength and, for single sites, its site chosen by AUROC on the calibration half's
validation records), scored on the evaluation half's tokens:

- ``site``: one residual stream, negatives = template tokens and PII the model does not
  recall (the run's probe);
- ``contrastive``: negatives = PII the model does not recall only (the same templates with
  values it never saw: non-members, and members it does not recite);
- ``token``: the state at the token itself instead of the one that predicts it;
- ``layers``: several residual streams at once (the best four by validation AUROC);
- ``site + confidence``: the best site with the model's max log-prob and entropy;
- ``mlp``: a two-layer perceptron on the best site: a ceiling for what is readable there;
- ``lens``: the logit lens of every residual site (how each layer, read through the model's
  final norm and unembedding, already predicts the model's prediction), alone, with the
  confidence, and with the confidence and the best site (and a perceptron on those);
- ``per field``: a probe per PII field (name, phone, ...) on the best site.

Every row gives the AUROC on all evaluation tokens and on PII tokens alone (memorized vs
not recalled), each with a 95% interval over records; the AUROC among tokens matched for
the model's confidence and the share of positives that found a match; the gain over the
confidence probe (max log-prob and entropy, fitted the same way) with its interval; and
the sequence-level AUROC (mean score per record; recited or not) beside loss, Min-K% and
zlib. Writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from memlens.core import jsonio
from memlens.core.model import load_model
from memlens.data.labels import Labels
from memlens.data.splits import Splits
from memlens.data.store import ActivationStore
from memlens.methods.probes import CONFIDENCE, ProbeConfig, ProbeData, score_metrics
from memlens.methods.probes.lens import LENS, lens_features
from memlens.methods.probes.metrics import confidence_gain, matched_auroc, sequence_aurocs

L2 = (1e-3, 1e-2, 1e-1, 1.0)  # inverse strengths (sklearn's C) tried on validation records


def halves_split(labels: Labels) -> dict[str, str]:
    """The run's probe split (:meth:`Splits.probe_split`): calibration records train (every
    fourth validates), the evaluation half tests."""
    from transformers import AutoTokenizer

    model = labels.identity.model
    return Splits.from_data(model, AutoTokenizer.from_pretrained(model)).probe_split()


class Variant:
    """Tokens of one probe setup (negatives, alignment) with the split's masks."""

    def __init__(self, store, labels, split, **config):
        self.data = ProbeData.from_store(store, labels, ProbeConfig(**config), split=split)
        tok = self.data.tokens
        self.y = tok["y"].to_numpy()
        self.groups = tok["id"].to_numpy()
        self.masks = {k: self.data.mask(k) for k in ("train", "val", "test")}
        self.pii = (tok["label"] != "generic").to_numpy()

    def x(self, sites: list[str]) -> np.ndarray:
        return self.data.combined(sites).astype(np.float32)


def fit(v: Variant, x: np.ndarray, model: str = "linear", keep: np.ndarray | None = None):
    """Fit on training tokens (``keep``: a subset of them), the L2 strength chosen on
    validation AUROC; returns (validation AUROC, scores of every token)."""
    tr, va = v.masks["train"], v.masks["val"]
    if keep is not None:
        tr, va = tr & keep, va & keep
    scale = StandardScaler().fit(x[tr])
    z = scale.transform(x)
    best = (-1.0, None)
    for c in L2:
        if model == "mlp":
            clf = MLPClassifier((256,), alpha=1 / c, max_iter=200, early_stopping=True,
                                random_state=0).fit(z[tr], v.y[tr])
            score = clf.predict_proba(z)[:, 1]
        else:
            clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(
                z[tr], v.y[tr])
            score = clf.decision_function(z)
        val = roc_auc_score(v.y[va], score[va]) if 0 < v.y[va].sum() < va.sum() else -1
        if val > best[0]:
            best = (val, score)
    return best


def scored(v: Variant, score: np.ndarray, confidence: np.ndarray, labels: Labels,
           keep: np.ndarray | None = None, name: str = "probe") -> dict:
    """Evaluation-half metrics of one probe's scores (``keep``: a subset of tokens)."""
    te = v.masks["test"] & (True if keep is None else keep)
    y, s, g = v.y[te], score[te], v.groups[te]
    m = score_metrics(y, s, g, 0.0, 200, 0)
    pii = v.pii[te]
    pii_m = score_metrics(y[pii], s[pii], g[pii], 0.0, 200, 0)
    matched, coverage = matched_auroc(y, s, v.data.tokens[["max_logprob", "entropy"]]
                                      .to_numpy()[te])
    gain = confidence_gain(y, s, confidence[te], g)
    tok = v.data.tokens[te].reset_index(drop=True).assign(**{name: s})
    seq = sequence_aurocs(tok, labels.sequences, [name]).get("sequence_memorized", {})
    return {"auroc": m["auroc"], "ci": [m["auroc_ci_low"], m["auroc_ci_high"]],
            "pii_auroc": pii_m["auroc"], "pii_ci": [pii_m["auroc_ci_low"],
                                                    pii_m["auroc_ci_high"]],
            "matched_auroc": matched, "matched_coverage": coverage,
            "gain_over_confidence": gain[0], "gain_ci": [gain[1], gain[2]],
            "sequence_auroc": seq.get("probes", {}).get(name, float("nan")),
            "sequence_baselines": seq.get("baselines", {}),
            "n_test_tokens": int(te.sum()), "n_test_positive": int(y.sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/probe_variants.json"))
    args = ap.parse_args()
    jsonio.write(args.out, variants(args.run))
    print(f"wrote {args.out}")


def variants(run: Path) -> dict:
    """Every variant on a ``memlens run`` directory; prints a row per variant as it goes."""
    t0 = time.perf_counter()
    labels = Labels.load(run / "labels")
    store = ActivationStore.open(run / "activations")
    split = halves_split(labels)
    sites = sorted(store.sites, key=lambda s: int(s.split(".")[1]))
    rows, curves = {}, {}

    def confidence_of(v: Variant) -> np.ndarray:
        return fit(v, v.x([CONFIDENCE]))[1]

    def by_site(v: Variant, name: str) -> str:
        conf = confidence_of(v)
        val, test = {}, {}
        for site in sites:
            val[site], score = fit(v, v.x([site]))
            te = v.masks["test"]
            test[site] = roc_auc_score(v.y[te], score[te])
        best = max(val, key=val.get)
        curves[name] = {"val_auroc": val, "test_auroc": test}
        rows[name] = {"site": best, "val_auroc": val[best],
                      **scored(v, fit(v, v.x([best]))[1], conf, labels)}
        print(f"{name:22} {best:28} " + table_cells(rows[name]), flush=True)
        return best

    base = Variant(store, labels, split)
    conf = confidence_of(base)
    rows["confidence"] = {"site": CONFIDENCE, **scored(base, conf, conf, labels)}
    print(f"{'confidence':22} {'':28} " + table_cells(rows["confidence"]), flush=True)
    best = by_site(base, "site")
    by_site(Variant(store, labels, split, negative=("not_memorized",)), "contrastive")
    by_site(Variant(store, labels, split, align="token"), "token")
    top4 = sorted(curves["site"]["val_auroc"], key=curves["site"]["val_auroc"].get)[-4:]
    # The logit lens of every residual site (the model's own final norm and unembedding).
    base.data = base.data.with_features(LENS, lens_features(
        load_model(labels.identity.model), base.data))
    for name, feats, model in (("layers", top4, "linear"),
                               ("site + confidence", [best, CONFIDENCE], "linear"),
                               ("mlp", [best], "mlp"),
                               ("lens", [LENS], "linear"),
                               ("lens + confidence", [LENS, CONFIDENCE], "linear"),
                               ("lens + confidence + site", [LENS, CONFIDENCE, best], "linear"),
                               ("mlp on lens + confidence + site", [LENS, CONFIDENCE, best],
                                "mlp")):
        val, score = fit(base, base.x(feats), model)
        rows[name] = {"site": "+".join(feats), "val_auroc": val,
                      **scored(base, score, conf, labels)}
        print(f"{name:22} {'+'.join(feats)[:28]:28} " + table_cells(rows[name]), flush=True)
    fields = base.data.tokens["field"].fillna("")
    per_field = {}
    x = base.x([best])
    for field in sorted(set(fields[base.y == 1])):
        keep = ((fields == field) | (base.data.tokens["label"] == "generic")).to_numpy()
        if base.y[keep & base.masks["val"]].sum() == 0:
            continue
        val, score = fit(base, x, keep=keep)
        per_field[field] = {"val_auroc": val,
                            **scored(base, score, conf, labels, keep=keep)}
    rows["per field"] = per_field
    for f, r in per_field.items():
        print(f"  field {f:16} {'':26} " + table_cells(r), flush=True)
    return {"run": str(run), "sites": sites, "variants": rows, "curves": curves,
            "l2_grid": list(L2), "seconds": round(time.perf_counter() - t0, 1)}


def table_cells(r: dict) -> str:
    return (f"AUROC {r['auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  PII {r['pii_auroc']:.3f}"
            f"  matched {r['matched_auroc']:.3f} ({r['matched_coverage']:.0%})  gain "
            f"{r['gain_over_confidence']:+.3f} [{r['gain_ci'][0]:+.3f}, {r['gain_ci'][1]:+.3f}]"
            f"  seq {r['sequence_auroc']:.3f} vs "
            f"{max(r['sequence_baselines'].values(), default=float('nan')):.3f}")


if __name__ == "__main__":
    main()
