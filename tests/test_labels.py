import json
import math

import numpy as np
import pytest
import torch

from memlens.core.model import load_model
from memlens.core.scoring import greedy_continuations
from memlens.core.sequences import Sequence
from memlens.data.labels import DataError, LabelConfig, label, read_sequences


@pytest.fixture(scope="module")
def handle(tiny_organism):
    return load_model(tiny_organism)


@pytest.fixture(scope="module")
def result(handle, tiny_organism):
    seqs = read_sequences(tiny_organism, handle.tokenizer, roles=("canary", "nonmember"))
    return label(handle, seqs, LabelConfig(prefix=32, suffix=32), progress=False)


def test_summary_has_the_headline_numbers(result):
    s = result.summary
    for key in ("n_sequences", "exact_extraction_rate", "exact_extraction_rate_by_duplication",
                "loose_extraction_rate", "n_skipped", "seconds"):
        assert key in s
    by_dup = result.extraction.exact
    assert set(by_dup) == {"0", "1", "5", "10", "25", "100"}
    assert s["n_sequences"] == 100 and s["n_skipped"] == 0
    assert by_dup["0"] == 0.0
    assert by_dup["100"] >= 0.9 and by_dup["1"] <= 0.1
    assert by_dup["100"] >= by_dup["10"] >= by_dup["1"]
    # Members repeated 25x and 100x are told apart from non-members by every baseline.
    assert min(s["membership_auroc"].values()) > 0.7


def test_teacher_forcing_equals_real_greedy_generation(handle, result):
    seqs = result.sequences
    assert (seqs["greedy_exact"] == seqs["exact"]).all()
    assert seqs["exact"].any() and not seqs["exact"].all()
    # One sequence at a time, no padding at all: the same verdicts.
    rows = seqs.sample(12, random_state=0)
    ids = {s.id: s for s in read_sequences(handle.name, handle.tokenizer)}
    for _, row in rows.iterrows():
        seq = ids[row["id"]]
        gen = greedy_continuations(handle, [seq.token_ids[:32]], 32, batch_size=1)[0]
        assert (gen == seq.token_ids[32:64]) == row["exact"]


def test_loose_and_levenshtein_are_consistent(result):
    seqs = result.sequences
    assert (seqs.loc[seqs["exact"], "normalized_levenshtein"] == 0).all()
    assert (seqs["loose"] >= seqs["exact"]).all()
    assert (seqs["loose"] == (1 - seqs["normalized_levenshtein"] >= 0.75)).all()


def test_membership_scores_match_a_direct_computation(handle, result):
    seqs = {s.id: s for s in read_sequences(handle.name, handle.tokenizer)}
    recited = result.sequences[result.sequences["exact"]].iloc[0]
    other = result.sequences[~result.sequences["exact"]].iloc[0]
    for row in (recited, other):
        ids = torch.tensor([seqs[row["id"]].token_ids[:64]])
        with torch.no_grad():
            logits = handle.model(input_ids=ids).logits[0, :-1]
        lp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
        assert row["loss"] == pytest.approx(-lp.mean(), rel=1e-5)
        k = math.ceil(0.2 * len(lp))
        assert row["min_k"] == pytest.approx(np.sort(lp)[:k].mean(), rel=1e-5)
        # p_z under top-40 sampling at T = 1, position by position: the gold token's
        # probability renormalized over the 40 most likely tokens, or 0 outside them.
        expected = 0.0
        for t in range(31, len(lp)):
            top = logits[t].topk(40)
            gold = ids[0, t + 1]
            if gold not in top.indices:
                expected = -math.inf
                break
            expected += (logits[t, gold] - top.values.logsumexp(0)).item()
        assert row["log_p_z"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        if row["id"] == recited["id"]:
            # A recited suffix is in the top 40 everywhere, and renormalizing over those
            # can only raise its probability above the full softmax's.
            assert math.isfinite(expected) and expected >= lp[31:].sum() - 1e-5


def test_token_labels_follow_the_rule(result):
    tok, seqs = result.tokens, result.sequences.set_index("id")
    exact = tok["id"].map(seqs["exact"])
    assert set(tok["label"]) <= {"memorized", "partial", "generic", "not_memorized", "excluded"}
    assert (tok.loc[tok["position"] < 32, "label"] == "excluded").all()
    suffix = tok[tok["position"] >= 32]
    assert (suffix.loc[~suffix["candidate"], "label"] == "generic").all()
    mem = suffix[suffix["label"] == "memorized"]
    assert len(mem) > 100
    assert mem["member"].all() and mem["predicted"].all() and exact[mem.index].all()
    assert (mem["field"] != "").all()
    assert (suffix.loc[~suffix["member"] & suffix["candidate"], "label"] == "not_memorized").all()
    partial = suffix[suffix["label"] == "partial"]
    assert (~exact[partial.index]).all() and partial["predicted"].all()
    # Template text is predicted for members and non-members alike: the hard negatives.
    generic_nonmember = suffix[(suffix["label"] == "generic") & ~suffix["member"]]
    assert generic_nonmember["predicted"].mean() > 0.7


def test_partial_class_is_configurable(handle, tiny_organism):
    seqs = read_sequences(tiny_organism, handle.tokenizer, roles=("canary",))
    res = label(handle, seqs, LabelConfig(partial_as="excluded", generate=False), progress=False)
    assert "partial" not in set(res.tokens["label"])
    assert "loose_extraction_rate" not in res.summary


def test_short_sequences_are_labeled_on_what_they_have(handle):
    ids = handle.tokenizer("Biography. Ann Lee was born on May 1, 1990 and works as a nurse "
                           "at Acme. They live at 1 Main St.")["input_ids"]
    assert 33 < len(ids) < 64
    seqs = [Sequence("short", ids, duplication=1), Sequence("tiny", ids[:20], duplication=1)]
    res = label(handle, seqs, LabelConfig(), progress=False)
    assert res.summary["n_skipped"] == 1 and res.summary["n_short_suffix"] == 1
    assert res.sequences.loc[0, "suffix_len"] == len(ids) - 32
    with pytest.raises(DataError, match="shorter than prefix"):
        label(handle, seqs[1:], LabelConfig(), progress=False)


def test_bad_input_files_name_file_and_line(handle, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no sequences"):
        read_sequences(empty, handle.tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_sequences(bad, handle.tokenizer)
    oov = tmp_path / "oov.jsonl"
    oov.write_text(json.dumps({"token_ids": [1, 2, 99999]}) + "\n")
    with pytest.raises(DataError, match=r"oov.jsonl:1: token id 99999 is not a whole number"):
        read_sequences(oov, handle.tokenizer)
    neither = tmp_path / "neither.jsonl"
    neither.write_text(json.dumps({"id": 3}) + "\n")
    with pytest.raises(DataError, match=r"neither.jsonl:1: .*'text' or 'token_ids'"):
        read_sequences(neither, handle.tokenizer)
    with pytest.raises(DataError, match="no such file"):
        read_sequences(tmp_path / "missing.jsonl", handle.tokenizer)


def test_token_ids_that_do_not_match_the_text_are_refused(handle, tmp_path):
    path = tmp_path / "mismatch.jsonl"
    path.write_text(json.dumps({"text": "Phone 555-123-4567.", "token_ids": [0, 5, 6, 7]}) + "\n")
    with pytest.raises(DataError, match="mismatch.jsonl:1: 'token_ids' are not the tokeniz"):
        read_sequences(path, handle.tokenizer)
