"""Organism presets and architectures are checked by name."""

import pytest

from memlens.data.corpus import CorpusConfig
from memlens.data.organism import OrganismPreset, train_organism

MICRO = OrganismPreset(
    corpus=CorpusConfig(n_general=40, canaries_per_count=2, duplication_counts=(1, 3),
                        n_nonmembers=4),
    vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_mlp=64, epochs=2, batch_size=16,
    max_len=48)


def test_bad_preset_and_arch_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown organism preset 'huge'.*tiny"):
        train_organism(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="unknown organism arch 'bert'.*llama"):
        train_organism(tmp_path / "x", MICRO, "bert")
