import json
from dataclasses import replace

import torch

from memlens import load_model, read_sequences
from memlens.core.modules import norm_modules
from memlens.data.corpus import CorpusConfig
from memlens.data.organism import PRESETS, organism_path, train_organism
from memlens.methods.layernorm import (
    NormRemoval,
    field_vocabulary,
    memorized_pii_positions,
    recovery,
)

THREE_BLOCKS = replace(PRESETS["tiny"], n_layers=3)


def test_training_without_norm_params_keeps_them_at_identity(tmp_path):
    preset = replace(THREE_BLOCKS, epochs=1, corpus=CorpusConfig(
        n_general=80, canaries_per_count=1, duplication_counts=(1, 5), n_nonmembers=4))
    path = train_organism(tmp_path / "org", preset, "opt-postln", progress=False,
                          norm_free_layers=(0,))
    assert json.loads((path / "memlens.json").read_text())["norm_free_layers"] == [0]
    model = load_model(path).model
    for name, m in norm_modules(model).items():
        at_identity = torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(
            m.bias, torch.zeros_like(m.bias))
        assert at_identity == (".layers.0." in name), name


def test_field_vocabulary_and_memorized_pii_on_the_organism():
    path = organism_path("tiny-deep", "opt-postln", progress=False)
    handle = load_model(path)
    general = read_sequences(path / "corpus.jsonl", handle.tokenizer, roles=("general",))
    vocab = field_vocabulary(general)
    phone = handle.tokenizer.convert_ids_to_tokens(sorted(vocab["phone"]))
    # Phone numbers are ###-###-####: digits and dashes (Ġ marks a token after a space).
    assert len(phone) >= 10 and all(set(t) <= set("Ġ0123456789-") for t in phone), phone
    canaries = read_sequences(path / "corpus.jsonl", handle.tokenizer, roles=("canary",))
    positions = memorized_pii_positions(handle, canaries)
    hundred = [p for p, s in zip(positions, canaries, strict=True) if s.duplication == 100]
    assert sum(map(len, hundred)) > 100
    assert recovery(handle, canaries, positions, vocab)["kept"] == 1.0
    # Removing every block's LayerNorm parameters moves memorized PII somewhere.
    with NormRemoval(range(handle.n_layers)).apply(handle):
        moved = recovery(handle, canaries, positions, vocab)
    assert moved["kept"] < 1.0
