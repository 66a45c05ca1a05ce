"""Unlearning by fine-tuning: the baselines a privacy reader expects beside memlens' edits,
and memlens' loss-matched forgetting, each a short loss over forget and retain batches on
one training loop.

- ``ga``, gradient ascent: maximize the forget set's loss (Jang et al. 2023, "Knowledge
  Unlearning for Mitigating Privacy Risks in Language Models").
- ``gd``, gradient difference: ascent on the forget set, descent on the retain set (Liu et
  al. 2022, "Continual Learning and Private Unlearning"; TOFU's "Grad. Diff.", Maini et
  al. 2024).
- ``npo``, negative preference optimization (Zhang et al. 2024): -(2/beta) E log
  sigmoid(-beta log(pi(y) / pi_ref(y))) over forget sequences, pi_ref the model before
  unlearning; plus the retain loss, as MUSE's and open-unlearning's NPO runs use.
- ``simnpo`` (Fan et al. 2024, "Simplicity Prevails"): NPO without the reference model,
  the log-likelihood length-normalized: -(2/beta) E log sigmoid(-(beta/|y|) log pi(y) -
  gamma); plus the retain loss.
- ``rmu``, representation misdirection (Li et al. 2024, WMDP): the forget set's hidden
  state after block l pushed onto a fixed random direction scaled to c, the retain set's
  held where the model had it (weight alpha); only the MLP output projections of blocks
  l-2..l train. c is ``rmu_scale`` times the mean norm of that hidden state on retain text
  (the paper's absolute 6.5 fits one 7B model's scale).
- ``matched``, loss-matched forgetting (memlens): the forget set's token losses pulled
  onto the distribution of the model's own current losses on text it never saw, not up
  without bound (membership inference reads a loss pushed past unseen text as surely as
  one pulled below it); the retain set's token losses held at their values before.

Each trains in place: wrap it in :func:`restorable` to undo.

Example:
    >>> with restorable(handle):
    ...     unlearn(handle, forget_ids, retain_ids, UnlearnConfig(method="npo"), steps=40)
    ...     print(exact_extraction(handle, forget, ExtractionConfig()))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from memlens.core.config import COUNT, INDEX, NONNEGATIVE, POSITIVE, REAL, Config, option
from memlens.core.errors import ConfigError, DataError
from memlens.core.model import ModelHandle
from memlens.core.modules import block_parameters, mlp_output_layers, tracking_gradients
from memlens.core.progress import progress as progress_bar
from memlens.core.scoring import batch_losses, forward, token_losses
from memlens.core.sites import block_output
from memlens.methods.edits import WeightEdit

__all__ = ["METHODS", "OBJECTIVES", "RETAINING", "UnlearnConfig", "Unlearner", "restorable",
           "token_loss_values", "trainable", "unlearn"]

METHODS = {"ga": "gradient ascent", "gd": "gradient difference", "npo": "NPO",
           "simnpo": "SimNPO", "rmu": "RMU", "matched": "loss-matched forgetting"}
# Every objective the loop trains: the methods, and plain fine-tuning on the "forget"
# sequences (what a relearning attacker does).
OBJECTIVES = {**METHODS, "finetune": "fine-tuning"}
RETAINING = ("gd", "npo", "simnpo", "rmu", "matched")  # the methods that need retain text


@dataclass
class UnlearnConfig(Config):
    """How a forget set is unlearned: ``method`` (see :data:`METHODS`), AdamW at ``lr``,
    ``batch_size`` forget (and retain) sequences a step, the retain loss weighted by
    ``retain_weight`` (``rmu_alpha`` for RMU), the blocks that train (None: every
    weight)."""

    method: str = option("npo", "unlearning method ('finetune': learn the sequences "
                         "instead)", choices=tuple(OBJECTIVES))
    lr: float = option(1e-4, "learning rate", POSITIVE)
    batch_size: int = option(8, "forget (and retain) sequences per step", COUNT)
    retain_weight: float = option(1.0, "weight of the retain loss (gd, npo, simnpo, "
                                  "matched)", NONNEGATIVE)
    npo_beta: float = option(0.1, "NPO's inverse temperature beta", POSITIVE)
    simnpo_beta: float = option(2.5, "SimNPO's beta", POSITIVE)
    simnpo_gamma: float = option(0.0, "SimNPO's reward margin gamma", REAL)
    rmu_layer: int | None = option(None, "RMU's block l (default: the last block that "
                                   "trains)", INDEX)
    rmu_scale: float = option(5.0, "RMU's target norm c over the mean hidden-state norm on "
                              "retain text", POSITIVE)
    rmu_alpha: float = option(100.0, "RMU's retain weight alpha", NONNEGATIVE)
    refresh: int = option(10, "loss matching: steps between re-measurements of the unseen "
                          "text's losses", COUNT)
    blocks: tuple[int, ...] | None = option(None, "only these blocks train (and the final "
                                            "norm; RMU: its own blocks among them)", INDEX)
    seed: int = option(0, "seed of the batch order and RMU's direction", INDEX)

    def __post_init__(self):
        if self.blocks is not None:
            self.blocks = tuple(self.blocks)
        super().__post_init__()


@contextlib.contextmanager
def restorable(handle: ModelHandle):
    """Every parameter comes back, bit for bit, when the block ends (for in-place training)."""
    with WeightEdit(handle) as edit:
        for name, p in handle.model.named_parameters():
            edit.set(name, p.detach())
        yield edit


def _row_losses(handle: ModelHandle, token_ids: list[list[int]], batch_size: int = 32
                ) -> list[torch.Tensor]:
    """Per sequence, its next-token losses (no gradients)."""
    return [row[k].cpu() for loss, keep in batch_losses(handle, token_ids, batch_size)
            for row, k in zip(loss, keep, strict=True)]


def token_loss_values(handle: ModelHandle, token_ids: list[list[int]],
                      batch_size: int = 32) -> torch.Tensor:
    """Every next-token loss in ``token_ids``, as one flat tensor."""
    return torch.cat(_row_losses(handle, token_ids, batch_size))


def trainable(handle: ModelHandle, cfg: UnlearnConfig) -> dict[str, torch.nn.Parameter]:
    """The parameters ``cfg`` trains, by name: RMU's MLP output projections of blocks
    l-2..l, else ``cfg.blocks``' parameters (every parameter when None)."""
    model = handle.model
    if cfg.method != "rmu":
        return (dict(model.named_parameters()) if cfg.blocks is None
                else block_parameters(model, cfg.blocks))
    layer = _rmu_layer(handle, cfg)
    wanted = {b for b in range(layer - 2, layer + 1)
              if b >= 0 and (cfg.blocks is None or b in cfg.blocks)}
    names = {f"{n}.weight" for n in mlp_output_layers(model)
             if int(n.split(".")[-3]) in wanted}
    return {n: p for n, p in model.named_parameters() if n in names}


def _rmu_layer(handle: ModelHandle, cfg: UnlearnConfig) -> int:
    layer = cfg.rmu_layer if cfg.rmu_layer is not None else (
        max(cfg.blocks) if cfg.blocks else handle.n_layers // 2)
    if not 0 <= layer < handle.n_layers:
        raise ConfigError(f"rmu_layer {layer}: the model has blocks 0..{handle.n_layers - 1}")
    return layer


class _Order:
    """Random batches of indices, each index once per pass."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen, self.queue = n, batch_size, gen, []

    def next(self) -> list[int]:
        while len(self.queue) < min(self.batch_size, self.n):
            self.queue += torch.randperm(self.n, generator=self.gen).tolist()
        out, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        return out


class Unlearner:
    """One unlearning run, trained a few steps at a time (:meth:`advance`): what it needs
    is measured once (the reference log-likelihoods, the frozen hidden states, the random
    direction), and its optimizer and trained values persist between calls, so a
    calibration that scores after 5, 10, 20... steps trains once. Between calls the
    model may be put back (:func:`restorable`): :meth:`advance` reloads the values it
    trained first.

    ``forget``: token ids to unlearn. ``retain``: token ids whose behaviour should stay.
    ``unseen``: token ids of text the model never saw (loss matching's reference)."""

    def __init__(self, handle: ModelHandle, forget: list[list[int]], retain: list[list[int]],
                 cfg: UnlearnConfig, unseen: list[list[int]] | None = None):
        if not forget:
            raise DataError("unlearning needs at least one forget sequence")
        if cfg.method in RETAINING and not retain:
            raise DataError(f"{METHODS[cfg.method]} needs retain sequences (text whose "
                            "behaviour should stay)")
        if cfg.method == "matched" and not unseen:
            raise DataError("loss-matched forgetting needs text the model never saw (held-out "
                            "non-members) to match the forget set's losses to")
        forgotten = {tuple(ids) for ids in forget}
        if any(tuple(ids) in forgotten for ids in retain):
            raise DataError("a retain sequence is in the forget set; keep them apart")
        self.handle, self.forget, self.retain, self.cfg = handle, forget, retain, cfg
        self.unseen = unseen or []
        self.params = trainable(handle, cfg)
        self.opt = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.forget_order = _Order(len(forget), cfg.batch_size, self.gen)
        self.retain_order = _Order(max(len(retain), 1), cfg.batch_size, self.gen)
        self.step = 0
        self.trained: dict[str, torch.Tensor] | None = None
        self._prepare()

    def _pad(self, seqs: list[list[int]]):
        return self.handle.pad(seqs, side="right")

    @torch.no_grad()
    def _prepare(self) -> None:
        cfg, h = self.cfg, self.handle
        if cfg.method == "npo":  # log pi_ref(y) per forget sequence
            self.ref = torch.stack([-row.sum() for row in _row_losses(h, self.forget)])
        if cfg.method == "matched":
            self.before = _row_losses(h, self.retain)
        if cfg.method == "rmu":
            self.layer = _rmu_layer(h, cfg)
            self.frozen, norms = [], []
            for i in range(0, len(self.retain), 32):
                chunk = self.retain[i:i + 32]
                ids, mask = self._pad(chunk)
                states = block_output(h.model, ids, mask, self.layer).float()
                for b, seq in enumerate(chunk):
                    self.frozen.append(states[b, :len(seq)].cpu())
                    norms.append(states[b, :len(seq)].norm(dim=-1))
            u = torch.rand(states.shape[-1], generator=self.gen)  # as WMDP draws it
            self.target = u / u.norm() * cfg.rmu_scale * torch.cat(norms).mean().cpu()

    def _losses(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._pad(seqs)
        loss, _, keep = token_losses(forward(self.handle, ids, mask), ids, mask)
        return loss, keep

    def _retain_loss(self, pick: list[int]) -> torch.Tensor:
        loss, keep = self._losses([self.retain[i] for i in pick])
        return loss[keep].mean()

    def _states(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._pad(seqs)
        return block_output(self.handle.model, ids, mask, self.layer).float(), mask.bool()

    def loss(self) -> torch.Tensor:
        """The method's loss on the next forget (and retain) batch."""
        cfg, m = self.cfg, self.cfg.method
        pick = self.forget_order.next()
        keep_pick = self.retain_order.next() if m in RETAINING else []
        forget = [self.forget[i] for i in pick]
        if m == "rmu":
            h, mask = self._states(forget)
            away = (h - self.target.to(h.device)).square().mean(-1)[mask].mean()
            h, mask = self._states([self.retain[i] for i in keep_pick])
            frozen = torch.nn.utils.rnn.pad_sequence(
                [self.frozen[i] for i in keep_pick], batch_first=True).to(h.device)
            return away + cfg.rmu_alpha * (h - frozen).square().mean(-1)[mask].mean()
        loss, keep = self._losses(forget)
        if m == "matched":  # 1-D optimal transport onto the unseen text's current losses
            got = loss[keep].sort().values
            ref = torch.quantile(self.unseen_losses.float(), torch.linspace(0, 1, len(got)))
            out = (got - ref.to(got.device)).square().mean()
            ids, mask = self._pad([self.retain[i] for i in keep_pick])
            now, _, k = token_losses(forward(self.handle, ids, mask), ids, mask)
            held = torch.cat([self.before[i] for i in keep_pick]).to(now.device)
            return out + cfg.retain_weight * (now[k] - held).square().mean()
        if m == "finetune":
            return loss[keep].mean()
        if m in ("ga", "gd"):
            out = -loss[keep].mean()
        else:
            logp = -(loss * keep).sum(1)
            if m == "npo":
                ratio = logp - self.ref[pick].to(logp.device)
                out = -2 / cfg.npo_beta * torch.nn.functional.logsigmoid(
                    -cfg.npo_beta * ratio).mean()
            else:  # simnpo
                reward = cfg.simnpo_beta / keep.sum(1) * logp
                out = -2 / cfg.simnpo_beta * torch.nn.functional.logsigmoid(
                    -reward - cfg.simnpo_gamma).mean()
        return out + cfg.retain_weight * self._retain_loss(keep_pick) if m != "ga" else out

    def advance(self, steps: int, every: Callable[[int], None] | None = None,
                progress: bool = False) -> None:
        """Train ``steps`` more steps in place (from the values trained so far);
        ``every(step)`` runs after each."""
        if self.trained is not None:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.trained[name])
            self.handle.reset_views()
        params = list(self.params.values())
        try:
            with tracking_gradients(self.handle.model, params):  # eval mode: no dropout
                for _ in progress_bar(range(steps), desc=OBJECTIVES[self.cfg.method],
                                      disable=not progress):
                    if self.cfg.method == "matched" and self.step % self.cfg.refresh == 0:
                        self.unseen_losses = token_loss_values(self.handle, self.unseen)
                    loss = self.loss()
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    self.opt.step()
                    self.handle.reset_views()
                    self.step += 1
                    if every is not None:
                        every(self.step)
        finally:
            for p in params:
                p.grad = None
        self.trained = {n: p.detach().clone() for n, p in self.params.items()}


def unlearn(handle: ModelHandle, forget: list[list[int]], retain: list[list[int]],
            cfg: UnlearnConfig, steps: int, unseen: list[list[int]] | None = None,
            every: Callable[[int], None] | None = None, progress: bool = False) -> Unlearner:
    """``steps`` steps of ``cfg.method`` on ``forget`` (holding ``retain``), in place; wrap
    in :func:`restorable` to undo. Returns the run (``advance`` trains it further)."""
    run = Unlearner(handle, forget, retain, cfg, unseen)
    run.advance(steps, every, progress)
    return run
