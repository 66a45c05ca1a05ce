import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import memlens.data.organism as organism
from memlens.core.model import load_model
from memlens.data.corpus import CorpusConfig
from memlens.data.labels import read_sequences
from memlens.data.organism import OrganismPreset, organism_path, train_organism

MICRO = OrganismPreset(
    corpus=CorpusConfig(n_general=40, canaries_per_count=2, duplication_counts=(1, 3),
                        n_nonmembers=4),
    vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_mlp=64, epochs=2, batch_size=16,
    max_len=48)


def test_tiny_organism_is_a_model_dir_with_ground_truth(tiny_organism):
    meta = json.loads((tiny_organism / "memlens.json").read_text())
    assert meta["preset"] == "tiny" and meta["arch"] == "llama"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "corpus.jsonl"):
        assert (tiny_organism / name).exists(), name
    handle = load_model(tiny_organism)
    records = [json.loads(line) for line in open(tiny_organism / "corpus.jsonl")]
    roles = {r["role"] for r in records}
    assert roles == {"general", "canary", "nonmember"}
    assert {r["duplication"] for r in records if r["role"] == "nonmember"} == {0}
    for r in records[:50]:  # token ids in the manifest are the tokenizer's, BOS first
        assert r["token_ids"][0] == handle.tokenizer.bos_token_id
        assert r["token_ids"] == handle.tokenizer(r["text"])["input_ids"][:len(r["token_ids"])]
    # Template text is learned (generalization); PII of unseen records is not.
    assert meta["heldout_template_accuracy"] > 0.85
    assert meta["heldout_pii_accuracy"] < meta["heldout_template_accuracy"] - 0.4
    seqs = read_sequences(tiny_organism, handle.tokenizer, roles=("nonmember",))
    assert len(seqs) == 50


def test_organism_path_reuses_the_cache(tiny_organism):
    stamp = (tiny_organism / "model.safetensors").stat().st_mtime
    assert organism_path("tiny", "llama", seed=0, progress=False) == tiny_organism
    assert (tiny_organism / "model.safetensors").stat().st_mtime == stamp


def test_a_cache_from_other_library_releases_is_not_reused(tiny_organism, monkeypatch):
    """The releases that take part in training are in the cache key (and the metadata): an
    organism trained with another Faker or transformers is another organism."""
    import json

    from memlens.data import organism

    assert organism.organism_dir("tiny", "llama", 0) == tiny_organism
    meta = json.loads((tiny_organism / "memlens.json").read_text())
    assert meta["libraries"] == organism.library_versions()
    assert set(meta["libraries"]) == {"torch", "transformers", "tokenizers", "faker", "numpy"}
    for name in organism.TRAINING_LIBRARIES:
        changed = {**organism.library_versions(), name: "0.0.1"}
        monkeypatch.setattr(organism, "library_versions", lambda changed=changed: changed)
        assert organism.organism_dir("tiny", "llama", 0) != tiny_organism, name
        monkeypatch.undo()


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_training_is_deterministic(arch, tmp_path):
    a = train_organism(tmp_path / "a", MICRO, arch, seed=3, progress=False)
    b = train_organism(tmp_path / "b", MICRO, arch, seed=3, progress=False)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert (a / "corpus.jsonl").read_text() == (b / "corpus.jsonl").read_text()


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    full = train_organism(tmp_path / "full", MICRO, "llama", seed=1, progress=False)
    save = organism._save_checkpoint

    def save_then_die(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(organism, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_organism(tmp_path / "resumed", MICRO, "llama", seed=1, progress=False)
    with safe_open(str(tmp_path / "resumed.partial" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata() == {"epochs_done": "1"}  # written with the weights, atomically
    monkeypatch.setattr(organism, "_save_checkpoint", save)
    resumed = train_organism(tmp_path / "resumed", MICRO, "llama", seed=1, progress=False)
    wa, wb = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert not (tmp_path / "resumed.partial").exists()


