"""The core: the rule for unknown duplication, artifact identity, input validation, and
progress bars that stay short in logs."""

import json

import pytest

from memlens.core.errors import ArtifactMismatch, DataError, UserError
from memlens.core.identity import Identity, corpus_hash
from memlens.core.metrics import edit_metrics
from memlens.core.model import load_model
from memlens.core.sequences import Sequence
from memlens.data.labels import LabelConfig, label, read_sequences


def test_labels_and_edit_metrics_follow_the_same_rule(tiny_organism):
    handle = load_model(tiny_organism)
    seqs = read_sequences(tiny_organism, handle.tokenizer, roles=("canary", "nonmember"))
    hundred = [s for s in seqs if s.duplication == 100][:4]
    unknown = [Sequence(f"u{s.id}", s.token_ids, duplication=None) for s in hundred]
    nonmembers = [s for s in seqs if s.duplication == 0][:6]
    mixed = hundred + unknown + nonmembers
    labels = label(handle, mixed, LabelConfig(generate=False), progress=False)
    by_dup = labels.extraction.exact
    assert list(by_dup) == ["0", "100", "unknown"]
    assert by_dup["unknown"] == by_dup["100"] >= 0.75  # the same texts, recited the same
    assert labels.summary["n_by_duplication"] == {"0": 6, "100": 4, "unknown": 4}
    # Members of unknown count are members: their PII can be labeled memorized...
    tok = labels.tokens
    assert (tok[tok["id"].str.startswith("u")]["label"] == "memorized").any()
    # ...but membership AUROCs use known membership only: the unknown ones change nothing.
    known = label(handle, hundred + nonmembers, LabelConfig(generate=False), progress=False)
    assert labels.summary["membership_auroc"] == known.summary["membership_auroc"]
    metrics = edit_metrics(handle, mixed, [s.token_ids for s in nonmembers], loose=False)
    assert metrics.exact == by_dup


@pytest.mark.parametrize("value", [-3, 2.5, "many", True])
def test_bad_duplication_is_refused_with_file_and_line(tiny_organism, tmp_path, value):
    handle = load_model(tiny_organism)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" +
                    json.dumps({"text": "Phone 555-1234", "duplication": value}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: duplication .* whole number >= 0"):
        read_sequences(path, handle.tokenizer)


def test_identity_names_what_changed(tiny_organism):
    handle = load_model(tiny_organism)
    seqs = [Sequence("a", [1, 2, 3]), Sequence("b", [1, 4])]
    ident = Identity.make("labels", handle, seqs, {"prefix": (32,)})
    assert ident.config == {"prefix": [32]}  # JSON round trip: equal after save and load
    assert Identity.from_json(json.loads(json.dumps(ident.to_json())), "x") == ident
    ident.check_model(handle, "labels/")
    other = ident.with_changes(model_hash="0" * 16)
    with pytest.raises(ArtifactMismatch, match="labels/ was made with model weights 0000"):
        other.check_model(handle, "labels/")
    store = ident.with_changes(kind="store", corpus_hash=corpus_hash(seqs[:1]))
    with pytest.raises(ArtifactMismatch, match="the corpus changed"):
        ident.check_corpus(store, "labels/", "store/")
    with pytest.raises(DataError, match="no memlens identity header"):
        Identity.from_json({"kind": "labels"}, "old/")
    assert issubclass(ArtifactMismatch, UserError) and issubclass(UserError, ValueError)


