import pytest
import torch
from sklearn.metrics import roc_auc_score

from memlens import load_model, read_sequences
from memlens.cli import main
from memlens.edits import edit_metrics
from memlens.labels import LabelConfig, label
from memlens.steering import (
    generate_side_by_side,
    memorization_states,
    probe_vector,
    steer,
)

SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def fitted(tiny_organism):
    handle = load_model(tiny_organism)
    seqs = read_sequences(tiny_organism / "corpus.jsonl", handle.tokenizer,
                          roles=("canary", "nonmember"))
    tokens = label(handle, seqs, LabelConfig(generate=False), progress=False).tokens
    canaries = [s for s in seqs if s.duplication]
    nonmembers = [s for s in seqs if not s.duplication]
    aim = canaries[0::2] + nonmembers[0::2]
    states = memorization_states(handle, SITE, aim, tokens)
    held = memorization_states(handle, SITE, canaries[1::2] + nonmembers[1::2], tokens)
    return handle, states, held, canaries[1::2], [s.token_ids for s in nonmembers[1::2]]


def test_states_probe_and_direction_separate_memorized_predictions(fitted):
    handle, states, held, _, _ = fitted
    assert states.x.shape == (len(states.y), handle.config.hidden_size)
    assert 0.05 < states.y.float().mean() < 0.95
    probe = states.fit_probe()
    assert roc_auc_score(held.y.numpy(), probe.score(held.x).numpy()) > 0.75
    d = states.mean_difference()
    assert roc_auc_score(held.y.numpy(), (held.x @ d).numpy()) > 0.6
    assert torch.isclose(probe_vector(probe).norm(), torch.tensor(float(
        (probe.std ** 2).sum() ** 0.5)), rtol=1e-4)


def test_dynamic_steering_stops_recitation_and_spares_clean_text(fitted):
    handle, states, _, canaries, heldout = fitted
    probe, d = states.fit_probe(), states.mean_difference()
    before = edit_metrics(handle, canaries, heldout, loose=False)
    assert before["exact_extraction_rate_by_duplication"]["100"] >= 0.8
    with steer(handle, SITE, d, 2.0, probe=probe):
        dynamic = edit_metrics(handle, canaries, heldout, loose=False)
    with steer(handle, SITE, d, 2.0):
        static = edit_metrics(handle, canaries, heldout, loose=False)
    # The tiny organism's probe is weak; measured: 100x 1.0 -> 0.6 at +0% (static: +13%).
    assert dynamic["exact_extraction_rate_by_duplication"]["100"] <= 0.8
    assert dynamic["perplexity"] < 1.03 * before["perplexity"]
    assert static["perplexity"] > 1.05 * before["perplexity"]
    with pytest.raises(ValueError, match="not 'blocks.1.hook_resid_post'"):
        with steer(handle, "blocks.1.hook_resid_post", d, 1.0, probe=probe):
            pass


def test_side_by_side_generation_and_steer_command(fitted, tiny_organism, tmp_path, capsys):
    handle, states, _, canaries, _ = fitted
    probe = states.fit_probe()
    prompt = handle.tokenizer.decode(canaries[-1].token_ids[:32], skip_special_tokens=True)
    table = generate_side_by_side(
        handle, [prompt], lambda: steer(handle, SITE, probe_vector(probe), 4.0, probe=probe))
    assert list(table.columns) == ["prompt", "plain", "steered"]
    assert table.plain[0] != table.steered[0]
    probe.save(tmp_path / "probe")
    (tmp_path / "prompts.txt").write_text(prompt + "\n\n" + prompt + "\n")
    assert main(["steer", "--model", str(tiny_organism), "--probe", str(tmp_path / "probe"),
                 "--alpha", "4", "--dynamic", "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "gen.csv")]) == 0
    assert (tmp_path / "gen.csv").read_text().count("\n") == 3
    assert main(["steer", "--model", str(tiny_organism), "--probe", str(tmp_path / "nope"),
                 "--alpha", "4", "--prompt", "x"]) == 2
    assert "holds no probe" in capsys.readouterr().err
