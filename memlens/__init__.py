"""memlens: locate, prove and remove memorization in transformer language models.

The names below load on first use, so ``import memlens.core.progress`` (or the command
line's ``--help``) does not pull in torch and transformers.
"""

from importlib import import_module

from memlens.core import logs
from memlens.core.version import VERSION

logs.quiet()

__version__ = VERSION

# The main verbs and the artifacts they make, in the order of the chain.
_EXPORTS = {
    # a model, and the organism memlens trains with planted canaries
    "load_model": "memlens.core.model", "ModelHandle": "memlens.core.model",
    "organism_path": "memlens.data.organism", "train_organism": "memlens.data.organism",
    "CorpusConfig": "memlens.data.corpus", "build_corpus": "memlens.data.corpus",
    "Splits": "memlens.data.splits",
    # label what the model recites
    "read_sequences": "memlens.data.labels", "label": "memlens.data.labels",
    "LabelConfig": "memlens.data.labels", "Labels": "memlens.data.labels",
    "edit_metrics": "memlens.core.metrics", "Extraction": "memlens.core.metrics",
    # capture activations and probe them
    "capture": "memlens.data.store", "CaptureConfig": "memlens.data.store",
    "ActivationStore": "memlens.data.store",
    "probe_sweep": "memlens.methods.probes", "ProbeConfig": "memlens.methods.probes",
    "ProbeData": "memlens.methods.probes", "Probe": "memlens.methods.probes",
    # curvature, localization, steering: each removal applies with removal.apply(handle)
    "collect_factors": "memlens.methods.curvature", "KFACConfig": "memlens.methods.curvature",
    "eigenbasis": "memlens.methods.curvature", "kfac_edit": "memlens.methods.curvature",
    "aimed_edit": "memlens.methods.curvature", "ParameterEdit": "memlens.methods.edits",
    "localize": "memlens.methods.localize", "LocalizeConfig": "memlens.methods.localize",
    "NeuronAblation": "memlens.methods.localize", "Steering": "memlens.methods.steering",
    "NormRemoval": "memlens.methods.layernorm",
    # does it forget, or only hide?
    "audit": "memlens.methods.audit", "AuditConfig": "memlens.methods.audit",
    "AuditData": "memlens.methods.audit",
    # the whole chain on any model and data (or on an organism), into one report
    "run": "memlens.steps.run", "RunConfig": "memlens.steps.chain",
    "run_demo": "memlens.steps.demo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memlens' has no attribute {name!r}")
