"""Linear probes that read memorization from activations, one per site (or site set).

A probe is a logistic regression on standardized activations. Splits are grouped
by sequence and stratified by duplication count; every metric is on held-out
sequences, with bootstrap confidence intervals over sequences.

    data      labeled tokens joined with a capture store; ProbeConfig
    solver    the fits (scikit-learn reference; batched streaming Newton / L-BFGS)
    metrics   AUROC with intervals, confidence-matched AUROC, baselines
    artifact  Probe: save, load, score, direction
    sweep     a probe per site and per combination, with control tasks

Example:
    >>> data = ProbeData.from_store(store, Labels.load("labels/"), ProbeConfig())
    >>> sweep = probe_sweep(data, labels.sequences)
    >>> sweep.results.sort_values("auroc").tail()
    >>> sweep.probes["blocks.3.hook_resid_post"].direction()   # for steering
"""

from memlens.methods.probes.artifact import Probe, fit_probe
from memlens.methods.probes.data import CONFIDENCE, ProbeConfig, ProbeData, split_sequences
from memlens.methods.probes.metrics import (
    confidence_gain,
    matched_auroc,
    score_metrics,
    tpr_at_fpr,
)
from memlens.methods.probes.solver import RowChunks, fit_chunks, fit_sklearn, fit_torch
from memlens.methods.probes.sweep import (
    FittedProbe,
    ProbeSweep,
    control_labels,
    fit_probes,
    probe_sweep,
)

__all__ = ["CONFIDENCE", "FittedProbe", "Probe", "ProbeConfig", "ProbeData", "ProbeSweep",
           "RowChunks", "confidence_gain", "control_labels", "fit_chunks", "fit_probe",
           "fit_probes", "fit_sklearn", "fit_torch", "matched_auroc", "probe_sweep",
           "score_metrics", "split_sequences", "tpr_at_fpr"]
