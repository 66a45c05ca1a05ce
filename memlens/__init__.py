"""memlens: locate, prove and remove memorization in transformer language models.

The names below load on first use, so ``import memlens.core.progress`` (or the command
line's ``--help``) does not pull in torch and transformers.
"""

from importlib import import_module

from memlens.core import logs
from memlens.core.version import VERSION

logs.quiet()

__version__ = VERSION

_EXPORTS = {
    "ModelHandle": "memlens.core.model", "load_model": "memlens.core.model",
    "CorpusConfig": "memlens.data.corpus", "build_corpus": "memlens.data.corpus",
    "LabelConfig": "memlens.data.labels", "Labels": "memlens.data.labels",
    "label": "memlens.data.labels",
    "read_sequences": "memlens.data.labels",
    "organism_path": "memlens.data.organism", "train_organism": "memlens.data.organism",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memlens' has no attribute {name!r}")
