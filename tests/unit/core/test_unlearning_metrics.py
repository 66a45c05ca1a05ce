"""The unlearning literature's metrics against hand computations: ROUGE-L and VerbMem,
Min-K%++, PrivLeak (sign and scale as MUSE publishes them), and the paired intervals."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memlens.core.errors import DataError
from memlens.core.metrics import (
    ExtractionConfig,
    perplexity_change_ci,
    privleak,
    privleak_ci,
    rouge_l,
    rouge_words,
    verbmem,
)
from memlens.core.model import load_model
from memlens.core.scoring import TokenScores, score_tokens
from memlens.core.sequences import Sequence
from memlens.data.labels import LabelConfig, _sequence_row


def test_rouge_l_is_the_lcs_f1_of_the_scorers_words():
    assert rouge_words("The cat, sat on-the MAT!") == ["the", "cat", "sat", "on", "the", "mat"]
    # LCS of "the cat sat on the mat" and "the cat on a mat": the cat on mat (4 words);
    # precision 4/6, recall 4/5, F1 = 2 * (2/3) * (4/5) / (2/3 + 4/5) = 8/11.
    got = rouge_l(rouge_words("the cat sat on the mat"), rouge_words("the cat on a mat"))
    assert got == pytest.approx(8 / 11)
    assert rouge_l(["a", "b"], ["a", "b"]) == 1.0
    assert rouge_l(["a"], ["b"]) == 0.0 and rouge_l([], ["a"]) == 0.0
    # Order matters (a subsequence, not a bag of words): b a vs a b shares one word.
    assert rouge_l(["b", "a"], ["a", "b"]) == pytest.approx(0.5)


class _Words:
    """A tokenizer whose token i is the word WORDS[i]."""

    WORDS = ["<s>", "my", "name", "is", "ada", "lovelace", "bob", "smith"]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.WORDS[i] for i in ids if not (skip_special_tokens and i == 0))


def test_verbmem_scores_each_continuation_against_its_true_suffix():
    handle = SimpleNamespace(tokenizer=_Words())
    cfg = ExtractionConfig(prefix=3, suffix=3)
    seqs = [Sequence("a", [0, 1, 2, 3, 4, 5]), Sequence("b", [0, 1, 2, 3, 6, 7])]
    # "is ada lovelace" recited; "is bob smith" continued as "is ada smith": LCS is smith
    # (2 of 3 words), F1 2/3.
    got = verbmem(handle, seqs, cfg, gens=[[3, 4, 5], [3, 4, 7]])
    assert got == pytest.approx([1.0, 2 / 3])


def test_min_k_pp_standardizes_each_gold_logprob_by_the_models_own_spread():
    lp = np.array([-0.1, -3.0, -0.5, -2.0, -0.2])
    ent = np.array([0.5, 1.0, 0.4, 2.0, 0.3])
    std = np.array([0.5, 2.0, 1.0, 0.5, 0.1])
    ts = TokenScores(lp, np.ones(5, bool), np.zeros(5, int), lp, ent, lp, std)
    row = _sequence_row(Sequence("x", list(range(6))), ts, LabelConfig(prefix=2, suffix=4,
                                                                       min_k=0.4),
                        SimpleNamespace(decode=lambda ids, **_: "abcdef"))
    z = [(-0.1 + 0.5) / 0.5, (-3 + 1) / 2, (-0.5 + 0.4) / 1, (-2 + 2) / 0.5, (-0.2 + 0.3) / 0.1]
    assert row["min_k_pp"] == pytest.approx(np.mean(sorted(z)[:2]))  # ceil(0.4 * 5) = 2
    assert row["min_k"] == pytest.approx(np.mean([-3.0, -2.0]))


def test_score_tokens_gives_the_spread_of_log_p_under_the_model(make_random_model,
                                                               saved_tokenizer, tmp_path):
    handle = load_model(make_random_model("llama", saved_tokenizer, tmp_path, seed=2))
    seq = [5, 9, 13, 200, 7]
    ts = next(score_tokens(handle, [seq]))
    with torch.no_grad():
        logp = handle.model(input_ids=torch.tensor([seq])).logits[0, :-1].float().log_softmax(-1)
    p = logp.exp()
    mean = (p * logp).sum(-1)
    want = ((p * (logp - mean[:, None]) ** 2).sum(-1)).sqrt()
    np.testing.assert_allclose(ts.logprob_std, want.numpy(), rtol=1e-4)
    np.testing.assert_allclose(ts.entropy, -mean.numpy(), rtol=1e-4)


def test_privleak_has_muses_sign_and_scale():
    # A model that still holds the forget set (every forget record looks trained on, AUROC
    # 1.0) against a retrained model at chance: MUSE's un-unlearned target, near -100.
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.5, 0.5) == 0.0  # as good as retraining
    assert privleak(0.75, 0.5) == pytest.approx(-50.0)
    assert privleak(0.25, 0.5) == pytest.approx(50.0)  # over-unlearned: also a tell
    # In MUSE's orientation (held-out records as positives) its retrained News model has
    # AUC 0.4772 by Min-40%; a model at AUC 0.0232 leaks (0.0232 - 0.4772) / 0.4772 x 100.
    assert privleak(1 - 0.0232, 1 - 0.4772) == pytest.approx(-95.14, abs=0.01)
    assert privleak(0.9, 1.0) is None  # retrained AUC 0 in MUSE's orientation


def test_privleak_interval_scores_both_models_on_the_same_draws():
    rng = np.random.default_rng(0)
    forget, non = rng.normal(2, 1, 30).tolist(), rng.normal(0, 1, 90).tolist()
    # The same model twice: every draw gives 0.
    assert privleak_ci(forget, non, forget, non) == (0.0, 0.0)
    # Perfect separation under the model, none under the retrained one (forget records
    # scored as non-members): every draw near -100.
    held = rng.normal(0, 1, 30).tolist()
    lo, hi = privleak_ci([10.0] * 30, non, held, non)
    assert -100 <= lo <= hi <= -50
    from sklearn.metrics import roc_auc_score

    y = [1] * 30 + [0] * 90
    point = privleak(roc_auc_score(y, forget + non), roc_auc_score(y, held + non))
    lo, hi = privleak_ci(forget, non, held, non)
    assert lo < point < hi
    with pytest.raises(DataError, match="same forget records"):
        privleak_ci(forget, non, forget[:-1], non)


def test_perplexity_change_interval_pairs_the_sequences():
    base = [(2.0 * n, n) for n in (10, 20, 15, 30)]  # loss 2 per token
    shifted = [(t + n * math.log(1.1), n) for t, n in base]  # every token 10% likelier lost
    lo, hi = perplexity_change_ci(shifted, base)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert perplexity_change_ci(base, base) == (0.0, 0.0)
    with pytest.raises(DataError, match="same sequences"):
        perplexity_change_ci(base[:2], base)
