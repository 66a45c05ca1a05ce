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
    "CorpusConfig": "memlens.corpus", "build_corpus": "memlens.corpus",
    "LabelConfig": "memlens.labels", "Labels": "memlens.labels", "label": "memlens.labels",
    "read_sequences": "memlens.labels",
    "organism_path": "memlens.organism", "train_organism": "memlens.organism",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memlens' has no attribute {name!r}")
