import json

import numpy as np
import pandas as pd
import pytest

from memlens.core.sites import UnknownSiteError
from memlens.data.store import ActivationStore
from memlens.methods.probes import (
    Probe,
    ProbeConfig,
    ProbeData,
    probe_sweep,
)
from memlens.steps.probe import run_config


@pytest.fixture(scope="module")
def run(tiny_organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("probes")
    config = out / "tiny.toml"
    config.write_text(f"""
out = "{out}"
trainers = ["torch", "sklearn"]
[model]
path = "{tiny_organism}"
[capture]
sites = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]
[probe]
n_bootstrap = 50
[combos]
all_sites = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]
""")
    return out, run_config(config, progress=False)


def test_config_run_writes_results_and_beats_single_sites(run):
    out, summary = run
    for name in ("results.json", "results.parquet", "layer_sweep.html"):
        assert (out / name).exists()
    written = json.loads((out / "results.json").read_text())
    assert written.pop("identity")["kind"] == "probes" and len(written.pop("checksum")) == 64
    assert written == summary
    results = pd.read_parquet(out / "results.parquet")
    probes = results[~results["control"] & (results["trainer"] == "torch")]
    assert set(probes["probe"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                    "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post",
                                    "confidence", "all_sites"}
    # The best probe is the one best on validation tokens, reported on test tokens.
    assert summary["selected_on"] == "val"
    assert summary["best_site"] == probes.loc[probes["val_auroc"].idxmax(), "probe"]
    assert summary["best_token_auroc"] == probes.set_index("probe")["auroc"][summary["best_site"]]
    assert min(summary["best_token_auroc"], summary["best_single_site_auroc"]) > 0.85
    assert summary["best_token_auroc"] > summary["token_baselines"]["token_logprob"] + 0.2
    assert (probes["auroc_ci_low"] <= probes["auroc"]).all()
    assert (probes["auroc"] <= probes["auroc_ci_high"]).all()
    # Control tasks: token identity is decodable, but less than memorization.
    assert summary["selectivity"] > 0.05
    # Among tokens the model is equally confident about, the activations alone (the combo
    # holds no confidence feature) still tell memorized tokens apart, well beyond what the
    # confidence probe has left there: what the residual stream adds.
    width = probes.set_index("probe")["n_features"]
    sites = [p for p in width.index if p.startswith("blocks.")]
    assert width["all_sites"] == width[sites].sum()  # the sites alone, no confidence feature
    matched = probes.set_index("probe")["matched_auroc"]
    assert matched["all_sites"] > matched["confidence"] + 0.1, matched
    # The two trainers agree site by site (on this small set, early stopping on the
    # validation split moves the torch fit off the fully converged sklearn one a little;
    # the median gap measured 0.004 to 0.008 on separately trained tiny organisms).
    wide = results[~results["control"]].pivot(index="probe", columns="trainer", values="auroc")
    assert (wide["torch"] - wide["sklearn"]).abs().max() < 0.03
    assert (wide["torch"] - wide["sklearn"]).abs().median() < 0.01
    seq = summary["sequence_level"]["sequence_memorized"]
    assert summary["best_sequence_auroc"] >= summary["baseline_sequence_auroc"] - 0.02
    assert set(seq["baselines"]) == {"loss", "min_k", "min_k_pp", "zlib"}


def test_splits_are_grouped_by_sequence(run):
    out, _ = run
    store = ActivationStore.open(out / "store")
    tokens = pd.read_parquet(out / "labels" / "tokens.parquet")
    data = ProbeData.from_store(store, tokens, ProbeConfig())
    per_seq = data.tokens.groupby("id")["split"].nunique()
    assert (per_seq == 1).all()
    strata = data.tokens.groupby("duplication")["split"].nunique()
    assert (strata == 3).all()  # every duplication count reaches train, val and test
    # Predicting alignment: the feature of token t is the activation at t - 1.
    row = data.tokens.iloc[5]
    site = "blocks.1.hook_resid_post"
    st = store.tokens
    j = st.index[(st["id"] == row["id"]) & (st["position"] == row["position"] - 1)][0]
    np.testing.assert_array_equal(data.features[site][5], store.array(site)[j])


def test_probes_stream_the_store_in_chunks_with_the_same_result(run):
    out, _ = run
    store = ActivationStore.open(out / "store")
    tokens = pd.read_parquet(out / "labels" / "tokens.parquet")
    site = "blocks.1.hook_resid_post"
    rows = np.array([len(store.tokens) - 1, 0, 7, 3, 7])
    np.testing.assert_array_equal(store.rows(site, rows).numpy(), store.array(site)[rows])
    whole = ProbeData.from_store(store, tokens, ProbeConfig(n_bootstrap=0), sites=[site])
    # 256-row chunks: the trainer reads the training tokens in many pieces
    pieces = ProbeData.from_store(store, tokens, ProbeConfig(n_bootstrap=0, chunk_mb=0),
                                  sites=[site])
    assert whole.mask("train").sum() > 4 * 256
    a, b = probe_sweep(whole, progress=False), probe_sweep(pieces, progress=False)
    # the AUROC to the same tolerance as the weights: a 1e-5 change can swap one ranked pair
    np.testing.assert_allclose(a.probes[site].weight, b.probes[site].weight, atol=1e-4)
    np.testing.assert_allclose(a.results["auroc"], b.results["auroc"], atol=1e-4)
    # the streamed fit matches scikit-learn's in-memory fit of the same problem
    sk = probe_sweep(pieces, trainers=("sklearn",), control=False, progress=False)
    assert abs(sk.results.set_index("probe")["auroc"][site]
               - b.results.set_index("probe")["auroc"][site]) < 0.01
    with pytest.raises(UnknownSiteError):
        ProbeData.from_store(store, tokens, ProbeConfig(), sites=["blocks.9.hook_resid_post"])


def test_saved_probe_round_trips_and_points_along_memorization(run):
    out, summary = run
    site = summary["best_single_site"]
    probe = Probe.load(out / "probes" / site)
    assert probe.sites == [site] and probe.align == "predicting"
    assert probe.metrics["auroc"] == pytest.approx(summary["best_single_site_auroc"])
    noise = np.random.default_rng(0).normal(size=(5, len(probe.mean)))
    x = (probe.mean + 0.1 * probe.std * noise).astype(np.float32)  # states like the site's
    again = Probe.load(probe.save(out / "copy"))
    np.testing.assert_allclose(again.score(x), probe.score(x))
    v = probe.direction()
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert (probe.score(x + 3 * v) > probe.score(x)).all()
    assert (probe.score(x - 3 * v) < probe.score(x)).all()
    # On the captured activations, memorized tokens sit further along the direction.
    store = ActivationStore.open(out / "store")
    tokens = pd.read_parquet(out / "labels" / "tokens.parquet")
    data = ProbeData.from_store(store, tokens, ProbeConfig(), sites=[site])
    along = data.features[site] @ v
    y = data.tokens["y"].to_numpy() == 1
    assert along[y].mean() > along[~y].mean()
    assert probe.class_gap > 0
    with pytest.raises(FileNotFoundError, match="holds no probe"):
        Probe.load(out)


def test_every_metric_has_a_bootstrap_interval(run):
    out, _ = run
    results = pd.read_parquet(out / "results.parquet")
    for m in ("auroc", "accuracy", "f1", "tpr_at_1pct_fpr"):
        assert (results[f"{m}_ci_low"] <= results[m] + 1e-9).all(), m
        assert (results[m] <= results[f"{m}_ci_high"] + 1e-9).all(), m
        assert (results[f"{m}_ci_high"] > results[f"{m}_ci_low"]).any(), m


