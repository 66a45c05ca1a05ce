"""The unlearning baselines on the tiny organism: each loss against its definition computed
by hand on the model before any step, and each run lowering the forget set's extraction,
undone bit for bit afterwards."""

import math

import pytest
import torch

from memlens.core.errors import DataError
from memlens.core.metrics import ExtractionConfig, exact_extraction
from memlens.core.model import load_model
from memlens.data.splits import Splits
from memlens.methods.unlearn import METHODS, UnlearnConfig, Unlearner, restorable, unlearn


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    handle = load_model(tiny_organism)
    splits = Splits.from_organism(tiny_organism, handle.tokenizer)
    forget = [s for s in splits.canaries if s.duplication == 100]
    retain = [s.token_ids for s in splits.general[:4]]
    unseen = [s.token_ids[:64] for s in splits.nonmembers[:8]]
    return handle, forget, retain, unseen


def token_losses_by_hand(handle, seq):
    """Next-token losses of one sequence, straight from the model."""
    with torch.no_grad():
        logits = handle.model(input_ids=torch.tensor([seq])).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:]), reduction="none")


def test_each_loss_is_its_definition_before_the_first_step(tiny):
    handle, forget, retain, unseen = tiny
    f = [s.token_ids[:64] for s in forget[:4]]
    # One batch holds every forget and every retain sequence, so no sampling is involved.
    fl = [token_losses_by_hand(handle, s) for s in f]
    rl = [token_losses_by_hand(handle, s) for s in retain]
    ce_f, ce_r = torch.cat(fl).mean(), torch.cat(rl).mean()
    logp = torch.stack([-x.sum() for x in fl])

    def loss(method, **kw):
        cfg = UnlearnConfig(method=method, batch_size=4, **kw)
        with torch.no_grad():
            return Unlearner(handle, f, retain, cfg, unseen).loss().item()

    assert loss("ga") == pytest.approx(-ce_f.item(), rel=1e-4)
    assert loss("gd") == pytest.approx((-ce_f + ce_r).item(), rel=1e-4)
    assert loss("finetune") == pytest.approx(ce_f.item(), rel=1e-4)
    # NPO: pi = pi_ref before any step, so each term is -(2/beta) log sigmoid(0) = (2/beta) ln 2.
    assert loss("npo", npo_beta=0.1) == pytest.approx(20 * math.log(2) + ce_r.item(), rel=1e-4)
    beta, gamma = 2.5, 0.5
    n = torch.tensor([len(x) for x in fl], dtype=torch.float32)
    sim = -2 / beta * torch.nn.functional.logsigmoid(-beta / n * logp - gamma).mean()
    assert loss("simnpo", simnpo_beta=beta, simnpo_gamma=gamma) == pytest.approx(
        (sim + ce_r).item(), rel=1e-4)
    # RMU: the retain states are where they were (0); the forget states' squared distance
    # from c u, c = scale x the mean norm of the retain states (block 0's output: the
    # model's second hidden state).
    def states(s):
        with torch.no_grad():
            return handle.model(input_ids=torch.tensor([s]),
                                output_hidden_states=True).hidden_states[1][0].float()

    run = Unlearner(handle, f, retain, UnlearnConfig(method="rmu", batch_size=4, rmu_layer=0,
                                                    rmu_scale=3.0))
    c = 3.0 * torch.cat([states(s).norm(dim=-1) for s in retain]).mean()
    assert run.target.norm().item() == pytest.approx(c.item(), rel=1e-4)
    want = torch.cat([(states(s) - run.target).square().mean(-1) for s in f]).mean()
    with torch.no_grad():
        assert run.loss().item() == pytest.approx(want.item(), rel=1e-4)
    assert set(run.params) == {"model.layers.0.mlp.down_proj.weight"}
    # Loss matching: the forget set's sorted token losses against the unseen text's
    # quantiles, plus the retain losses' distance from themselves (0).
    run = Unlearner(handle, f, retain, UnlearnConfig(method="matched", batch_size=4), unseen)
    run.unseen_losses = torch.cat([token_losses_by_hand(handle, s) for s in unseen])
    got = torch.cat(fl).sort().values
    ref = torch.quantile(run.unseen_losses, torch.linspace(0, 1, len(got)))
    with torch.no_grad():
        assert run.loss().item() == pytest.approx((got - ref).square().mean().item(), rel=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_lowers_extraction_and_is_undone(tiny, method):
    handle, forget, retain, unseen = tiny
    cfg = ExtractionConfig()
    ids = [s.token_ids[:cfg.prefix + cfg.suffix] for s in forget]
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    assert sum(exact_extraction(handle, forget, cfg)) == len(forget)
    with restorable(handle):
        run = unlearn(handle, ids, retain, UnlearnConfig(method=method, lr=1e-3), 40,
                      unseen=unseen)
        left = sum(exact_extraction(handle, forget, cfg))
        assert left < len(forget), method
        assert run.step == 40
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())


def test_a_run_resumes_where_it_stopped(tiny):
    """Calibration scores after 5, 10, 20... steps of one run: training 5 + 5 steps with
    the model put back in between is training 10."""
    handle, forget, retain, unseen = tiny
    ids = [s.token_ids[:64] for s in forget]
    cfg = UnlearnConfig(method="npo", lr=1e-3)
    with restorable(handle):
        unlearn(handle, ids, retain, cfg, 10)
        straight = {k: v.clone() for k, v in handle.model.state_dict().items()}
    run = Unlearner(handle, ids, retain, cfg)
    for _ in range(2):
        with restorable(handle):
            run.advance(5)
            resumed = {k: v.clone() for k, v in handle.model.state_dict().items()}
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


def test_bad_inputs_say_what_to_give(tiny):
    handle, forget, retain, _ = tiny
    ids = [s.token_ids for s in forget]
    with pytest.raises(DataError, match="needs retain sequences"):
        Unlearner(handle, ids, [], UnlearnConfig(method="gd"))
    with pytest.raises(DataError, match="never saw"):
        Unlearner(handle, ids, retain, UnlearnConfig(method="matched"))
    with pytest.raises(DataError, match="in the forget set"):
        Unlearner(handle, ids, ids[:1], UnlearnConfig(method="npo"))
