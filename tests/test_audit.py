"""The forgetting audit: quantization against a plain round-to-nearest reference, relearning,
perturbed prompts, membership, and the retrain-without gold standard."""

import json

import pytest
import torch

from memlens.core.errors import ConfigError, DataError
from memlens.core.metrics import ExtractionConfig, exact_extraction
from memlens.core.model import load_model
from memlens.core.modules import linear_modules
from memlens.core.sequences import Sequence
from memlens.data.organism import organism_path
from memlens.data.splits import Splits
from memlens.methods.audit import (
    AuditConfig,
    AuditData,
    audit,
    fine_tune,
    membership,
    perturbed_extraction,
    perturbed_prompts,
    quantized,
    quantized_weights,
)
from memlens.methods.unlearn import restorable, token_loss_values


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    handle = load_model(tiny_organism)
    splits = Splits.from_organism(tiny_organism, handle.tokenizer)
    forget = [s for s in splits.canaries if s.duplication == 100]
    relearn = [s.token_ids for s in splits.canaries if s.duplication in (5, 10, 25)]
    relearn += [s.token_ids for s in splits.general[:200]]
    data = AuditData(forget, relearn, splits.nonmembers[:20], splits.heldout)
    return handle, splits, data


def _round_to_nearest(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, ...]:
    """Symmetric integers: scale = max |w| of the group / ((2^bits - 1) / 2); returns the
    rounded weights and each element's scale."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True) / ((hi - lo) / 2)
    rounded = (g / scale).round().clamp(lo, hi) * scale
    return rounded.reshape(w.shape), scale.expand_as(g).reshape(w.shape)


def test_quantization_is_round_to_nearest_and_comes_off(tiny):
    handle, _, _ = tiny
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    linears = linear_modules(handle.model)
    for bits, group in ((8, None), (4, 32)):
        got = quantized_weights(handle, bits, group)
        assert got, "no layer quantized"
        for name, value in got.items():
            w = linears[name.removesuffix(".weight")].weight.detach()
            ref, scale = _round_to_nearest(w, bits, group or w.shape[1])
            # The library rounds by the reciprocal scale: a value on a half step may land one
            # step away from the reference (measured: 0.1-0.4% of the elements); no more.
            steps = (value - ref).abs() / scale
            assert steps.max() < 1 + 1e-4 and (steps > 1e-4).float().mean() < 0.01, name
        sample = next(iter(got.values()))
        assert (sample - linears[next(iter(got)).removesuffix(".weight")].weight).abs().max() > 0
    with quantized(handle, 4, 32):
        name = next(iter(quantized_weights(handle, 8)))
        assert not torch.equal(handle.model.state_dict()[name], before[name])
    for k, v in handle.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ConfigError, match="bits=3; choose one of 8, 4"):
        AuditConfig(bits=(3,))


def test_audit_of_the_unedited_organism(tiny):
    handle, _, data = tiny
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    report = audit(handle, None, data, AuditConfig(relearn_steps=(2, 5), neighbours=2),
                   progress=False)
    assert report["after_edit"]["exact"] >= 0.9  # 100x canaries are recited
    assert report["int8"]["exact"] >= report["after_edit"]["exact"] - 0.1
    assert report["int8"]["perplexity"] == pytest.approx(report["after_edit"]["perplexity"],
                                                        rel=0.05)
    assert report["int4"]["perplexity"] > report["int8"]["perplexity"]
    assert set(report["relearn"]) == {"2", "5"}
    assert set(report["perturbed"]) == {"corrupt_start", "corrupt_end", "shorter_prefix",
                                        "longer_prefix"}
    assert report["mia_auroc"]["loss"] > 0.9 and report["mia_auroc"]["neighbourhood"] > 0.9
    for k, v in handle.model.state_dict().items():  # relearning was undone
        assert torch.equal(v, before[k]), k


def test_each_perturbed_prompt_changes_what_its_name_says():
    p, s, shift, corrupt = 32, 32, 8, 2
    seqs = [Sequence(str(i), list(range(1000 * (i + 1), 1000 * (i + 1) + n)))
            for i, n in enumerate((80, 72, 70))]
    cfg = ExtractionConfig(prefix=p, suffix=s)
    got = perturbed_prompts(seqs, cfg, vocab=50, bos=True, corrupt=corrupt, shift=shift)
    for q, start, end, shorter, longer in zip(seqs, *(got[k][0] for k in (
            "corrupt_start", "corrupt_end", "shorter_prefix", "longer_prefix")), strict=True):
        w = q.token_ids[:p + s]
        # Random tokens (< 50) only where the name says: never the BOS, never the suffix.
        assert [i for i, (a, b) in enumerate(zip(start, w, strict=True)) if a != b] == [1, 2]
        assert [i for i, (a, b) in enumerate(zip(end, w, strict=True)) if a != b] == [30, 31]
        # Shorter: the first tokens after the BOS dropped, the same suffix.
        assert got["shorter_prefix"][1] == p - shift
        assert shorter[:1] == w[:1] and shorter[1:p - shift] == w[1 + shift:p]
        assert shorter[p - shift:] == q.token_ids[p:p + s]
        # Longer: the prefix grows and the suffix moves on, as far as the sequence goes.
        assert got["longer_prefix"][1] == p + shift
        assert longer[:p + shift] == q.token_ids[:p + shift]
        assert longer[p + shift:] == q.token_ids[p + shift:p + shift + s]
    assert [len(x) - (p + shift) for x in got["longer_prefix"][0]] == [32, 32, 30]


def test_perturbations_change_the_prompt_where_they_say(tiny):
    handle, _, data = tiny
    cfg = ExtractionConfig()
    plain = sum(exact_extraction(handle, data.forget, cfg)) / len(data.forget)
    got = perturbed_extraction(handle, data.forget, cfg, corrupt=2, shift=8)
    # Corrupting the tokens right before the suffix hurts recall more than the first ones.
    assert got["corrupt_end"] <= got["corrupt_start"] <= plain
    noise = perturbed_extraction(handle, data.forget, cfg, corrupt=20, shift=8)
    assert noise["corrupt_end"] < plain


def test_gradient_ascent_hides_and_relearning_is_undone(tiny):
    handle, _, data = tiny
    cfg = ExtractionConfig()
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    forget_ids = [s.token_ids for s in data.forget]
    with restorable(handle):
        fine_tune(handle, forget_ids, steps=10, lr=1e-3, ascent=True)
        assert sum(exact_extraction(handle, data.forget, cfg)) == 0
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())
    with pytest.raises(DataError, match="in the forget set"):
        AuditData(data.forget, forget_ids[:1], data.nonmembers, data.heldout)


def test_loss_matched_forgetting_looks_like_unseen_text(tiny):
    handle, splits, data = tiny
    cfg = ExtractionConfig()
    cut = cfg.prefix + cfg.suffix
    forget_ids = [s.token_ids[:cut] for s in data.forget]
    own = [s.token_ids[:cut] for s in splits.nonmembers[20:]]  # not the scored ones
    general = [s.token_ids for s in splits.general[:128]]
    held_before = token_loss_values(handle, general)
    assert membership(handle, data.forget, data.nonmembers, cfg)["loss"] > 0.95
    with restorable(handle):
        fine_tune(handle, forget_ids, steps=100, lr=3e-4, match=own, anchor=general)
        assert sum(exact_extraction(handle, data.forget, cfg)) == 0
        # The forget set's token losses now sit where unseen text's do: neither recited
        # (AUROC near 1, as before) nor pushed past unseen text (near 0, as ascent can)...
        after, unseen = token_loss_values(handle, forget_ids), token_loss_values(handle, own)
        assert abs(after.mean() - unseen.mean()) < 0.15 * unseen.mean()
        mia = membership(handle, data.forget, data.nonmembers, cfg)
        assert all(0.25 < mia[k] < 0.8 for k in ("loss", "min_k", "zlib")), mia
        # ... and the anchored records' losses stayed where they were.
        held = token_loss_values(handle, general)
        assert abs(held.mean() / held_before.mean() - 1) < 0.05
    with pytest.raises(ConfigError, match="not both"):
        fine_tune(handle, forget_ids, 1, 1e-3, ascent=True, match=own)


def test_fine_tuning_some_blocks_leaves_the_others(tiny):
    handle, _, data = tiny
    before = {k: v.clone() for k, v in handle.model.named_parameters()}
    with restorable(handle):
        fine_tune(handle, data.relearn, 2, 1e-3, blocks=[1])
        changed = {k for k, v in handle.model.named_parameters()
                   if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight"
                           for k in changed), changed
    assert any(k.startswith("model.layers.1.mlp") for k in changed)
    with pytest.raises(ConfigError, match="do not exist"):
        fine_tune(handle, data.relearn, 1, 1e-3, blocks=[7])


def test_retrain_without_never_saw_the_forget_set(tiny):
    handle, splits, data = tiny
    ids = tuple(int(s.id) for s in data.forget)
    path = organism_path("tiny", "llama", seed=0, progress=False, withheld=ids)
    meta = json.loads((path / "memlens.json").read_text())
    assert meta["withheld"] == sorted(ids)
    without = load_model(path)
    rows = [json.loads(line) for line in open(path / "corpus.jsonl")]
    assert sorted(int(r["id"]) for r in rows if r["role"] == "withheld") == sorted(ids)
    cfg = ExtractionConfig()
    assert sum(exact_extraction(without, data.forget, cfg)) == 0
    others = [s for s in splits.canaries if s.duplication == 25]
    assert sum(exact_extraction(without, others, cfg)) >= 0.8 * len(others)
    with pytest.raises(ConfigError, match="not members"):
        organism_path("tiny", "llama", seed=0, progress=False,
                      withheld=(int(splits.nonmembers[0].id),))


def test_audit_command_compares_a_removal_with_the_unedited_model(tiny_organism, tmp_path,
                                                                 capsys):
    from memlens.cli import main

    org = str(tiny_organism)
    labels, neurons = tmp_path / "labels", tmp_path / "neurons"
    assert main(["label", "--model", org, "--data", org, "--out", str(labels),
                 "--no-generate"]) == 0
    assert main(["localize", "--model", org, "--labels", str(labels), "--method",
                 "activations", "--budget", "0.1", "--out", str(neurons)]) == 0
    out = tmp_path / "audit.json"
    args = ["audit", "--model", org, "--forget", org, "--forget-duplication", "100",
            "--retain", org, "--relearn-steps", "2", "4", "--bits", "8", "--relearn-blocks", "1"]
    assert main([*args, "--edit", str(neurons), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "neuron ablation" and report["forget"]["n"] == 10
    plain, ablated = report["unedited"], report["audited"]
    assert set(ablated) >= {"after_edit", "int8", "relearn", "perturbed", "mia_auroc"}
    assert "int4" not in ablated and set(ablated["relearn"]) == {"2", "4"}
    assert report["config"]["relearn_blocks"] == [1]
    assert plain["after_edit"]["exact"] >= 0.9
    # Zeroing 10% of the neurons most active on recited text stops some recitation.
    assert ablated["after_edit"]["exact"] < plain["after_edit"]["exact"]
    assert ablated["after_edit"]["perplexity"] > plain["after_edit"]["perplexity"]
    assert "exact extraction" in capsys.readouterr().out
    assert main([*args, "--edit", str(labels), "--out", str(tmp_path / "x.json")]) == 2
    assert "holds none of" in capsys.readouterr().err
    assert main([*args[:6], "7", *args[7:], "--out", str(tmp_path / "x.json")]) == 2
    assert "no sequence with duplication 7" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
