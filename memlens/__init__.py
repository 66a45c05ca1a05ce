"""memlens: locate, prove and remove memorization in transformer language models."""

from memlens.core.version import VERSION

__version__ = VERSION

from memlens.core.model import ModelHandle, load_model  # noqa: E402
from memlens.corpus import CorpusConfig, build_corpus  # noqa: E402
from memlens.labels import LabelConfig, Labels, label, read_sequences  # noqa: E402
from memlens.organism import organism_path, train_organism  # noqa: E402

__all__ = ["CorpusConfig", "LabelConfig", "Labels", "ModelHandle", "build_corpus", "label",
           "load_model", "organism_path", "read_sequences", "train_organism"]
