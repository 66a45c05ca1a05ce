"""The one teacher-forced scoring kernel: pad a batch, run the model, score next tokens.

Position ``t - 1`` predicts token ``t``. Every memlens step that needs logits goes through
:func:`forward`; every "which predictions count" question through :func:`predicts`; every
training or attribution objective through :func:`objective`. Shapes: ``ids`` and ``mask``
are [batch, pos]; logits [batch, pos, vocab]; per-prediction tensors [batch, pos - 1].

Example:
    >>> for chunk, ids, mask in batches(handle, token_lists, batch_size=32):
    ...     logits = forward(handle, ids, mask)
    ...     keep = predicts(mask, start=32)             # predictions of tokens 32, 33, ...
    ...     lp = gold_logprobs(logits, ids)             # [batch, pos - 1]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from memlens.core.errors import ConfigError
from memlens.core.model import ModelHandle
from memlens.core.progress import progress

__all__ = ["OBJECTIVES", "TokenScores", "batch_losses", "batches", "exact_matches", "forward",
           "gold_logprobs", "greedy_continuations", "logit_lens", "objective", "predicts",
           "sample_labels", "score_tokens", "sequence_logprob", "token_losses", "topk_logprob"]

OBJECTIVES = ("empirical", "true", "margin", "logprob")


def batches(handle: ModelHandle, seqs: list[list[int]], batch_size: int, side: str = "right",
            desc: str | None = None) -> Iterator[tuple[list[list[int]], torch.Tensor,
                                                         torch.Tensor]]:
    """Token-id lists in padded batches: ``(chunk, ids, mask)``, on the model's device.

    With ``desc``, a progress bar counts the batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    starts = range(0, len(seqs), batch_size)
    for i in progress(starts, desc=desc or "", unit="batch", disable=desc is None):
        chunk = seqs[i:i + batch_size]
        yield (chunk, *handle.pad(chunk, side=side))


def predicts(mask: torch.Tensor, start: int = 1) -> torch.Tensor:
    """[batch, pos - 1]: prediction ``t - 1 -> t`` is of a real token ``t >= start`` from a
    real position."""
    keep = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    keep[:, :max(start - 1, 0)] = False
    return keep


def forward(handle: ModelHandle, ids: torch.Tensor | None, mask: torch.Tensor | None = None, *,
            params: dict[str, torch.Tensor] | None = None,
            inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, pos, vocab] of one padded batch.

    ``params`` (name -> tensor) runs the model with those parameters instead of its own
    (``torch.func.functional_call``); ``inputs_embeds`` replaces ``ids`` (for gradients
    with respect to the input).
    """
    kwargs = {"attention_mask": mask}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = ids
    if params is not None:
        from torch.func import functional_call

        return functional_call(handle.model, params, args=(), kwargs=kwargs).logits
    return handle.model(**kwargs).logits


@torch.no_grad()
def logit_lens(handle: ModelHandle, resid: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [..., vocab] the model's own final norm and unembedding give a
    residual-stream state [..., d_model] (the logit lens, nostalgebraist 2020): on the last
    block's output, the model's next-token distribution."""
    from memlens.core.modules import final_norm

    model = handle.model
    norm = final_norm(model)
    head = model.get_output_embeddings()
    x = resid.to(head.weight.device, head.weight.dtype)
    return head(norm(x) if norm is not None else x).float().log_softmax(-1)


def gold_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t), fp32, [batch, pos - 1]."""
    return logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One label per row from softmax(logits), by inverse CDF (one uniform draw per row;
    ``torch.multinomial`` draws one exponential per vocabulary entry and is far slower)."""
    cdf = logits.detach().float().softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device)
    u = u * cdf[..., -1:]
    return torch.searchsorted(cdf, u)[..., 0].clamp_max(cdf.shape[-1] - 1)


def objective(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, mode: str,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A scalar summed over the kept predictions (``keep`` from :func:`predicts`):

    - ``"empirical"``: next-token loss on the gold tokens;
    - ``"true"``: next-token loss on labels sampled from the model (the true Fisher's);
    - ``"margin"``: the gold token's log-odds ``z_y - logsumexp_{k != y} z_k``, which unlike
      the loss does not vanish on text the model predicts with certainty;
    - ``"logprob"``: the gold tokens' summed log-probability.
    """
    if mode not in OBJECTIVES:
        raise ConfigError(f"objective {mode!r} is not one of {OBJECTIVES}")
    logits = logits[:, :-1]
    gold = ids[:, 1:]
    if mode == "margin":
        logits, gold = logits[keep].float(), gold[keep]
        z_gold = logits.gather(-1, gold[:, None])[:, 0]
        return (z_gold - logits.scatter(-1, gold[:, None], float("-inf")).logsumexp(-1)).sum()
    labels = gold if mode in ("empirical", "logprob") else sample_labels(logits, generator)
    labels = labels.masked_fill(~keep, -100)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels.reshape(-1), reduction="sum")
    return -loss if mode == "logprob" else loss


def sequence_logprob(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor
                     ) -> torch.Tensor:
    """Summed gold log-probability of the kept predictions, per sequence [batch]."""
    return (gold_logprobs(logits, ids) * keep).sum(-1)


def token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prediction: next-token loss, whether the argmax is the gold token, and whether it
    counts (both tokens real); each [batch, pos - 1]."""
    keep = predicts(mask)
    logits = logits[:, :-1].float()
    target = ids[:, 1:].masked_fill(~keep, -100)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    ).view(target.shape)
    return loss, logits.argmax(-1) == ids[:, 1:], keep


@dataclass
class TokenScores:
    """Per predicted token of one sequence (index ``t - 1`` is the prediction of token t):
    gold log-prob, argmax hit, argmax id, the model's confidence before it sees the token
    (max log-prob, entropy), the gold token's log-prob under top-k sampling, and the
    standard deviation of log p(z) over the model's own distribution z (with the entropy,
    the calibration Min-K%++ divides by)."""

    logprob: np.ndarray
    hit: np.ndarray
    argmax: np.ndarray
    max_logprob: np.ndarray
    entropy: np.ndarray
    sampling_logprob: np.ndarray
    logprob_std: np.ndarray


def topk_logprob(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float
                 ) -> torch.Tensor:
    """log p(target) under top-k sampling at ``temperature`` (-inf outside the top k)."""
    scaled = logits / temperature
    kth = scaled.topk(min(k, scaled.shape[-1]), dim=-1).values[..., -1:]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.log_softmax(-1).gather(-1, targets[..., None])[..., 0]


def batch_losses(handle: ModelHandle, seqs: list[list[int]], batch_size: int = 32
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(loss, keep)`` of :func:`token_losses` for each batch of ``seqs``, in order, without
    gradients: the one loop behind perplexity and every per-token or per-sequence loss."""
    for _, ids, mask in batches(handle, seqs, batch_size):
        with torch.no_grad():
            loss, _, keep = token_losses(forward(handle, ids, mask), ids, mask)
        yield loss, keep


@torch.no_grad()
def score_tokens(handle: ModelHandle, seqs: list[list[int]], batch_size: int = 32,
                 top_k: int = 40, temperature: float = 1.0, desc: str | None = None
                 ) -> Iterator[TokenScores]:
    """:class:`TokenScores` of every sequence, in order, from batched teacher forcing."""
    for chunk, ids, mask in batches(handle, seqs, batch_size, desc=desc):
        logits = forward(handle, ids, mask)[:, :-1].float()
        targets = ids[:, 1:]
        logprobs = logits.log_softmax(-1)
        probs = logprobs.exp()
        mean = (probs * logprobs).sum(-1)  # E_z log p(z): minus the entropy
        var = (probs * (logprobs - mean[..., None]).square()).sum(-1)  # centred: exact
        columns = (logprobs.gather(-1, targets[..., None])[..., 0],
                   logits.argmax(-1) == targets, logits.argmax(-1),
                   logprobs.max(-1).values, -mean,
                   topk_logprob(logits, targets, top_k, temperature),
                   var.clamp(min=1e-12).sqrt())
        columns = [c.cpu().numpy() for c in columns]
        for b, toks in enumerate(chunk):
            n = len(toks) - 1
            yield TokenScores(*(c[b, :n] for c in columns))


@torch.no_grad()
def exact_matches(handle: ModelHandle, seqs: list[list[int]], prefix: int,
                  batch_size: int = 32) -> list[bool]:
    """Per sequence: is the argmax right at every prediction of a token at index >= prefix?

    Greedy decoding from the first ``prefix`` tokens reproduces the rest iff it is, so this
    is exact extraction in one teacher-forced pass. Cut sequences to prefix + suffix first.
    """
    out = []
    for _, ids, mask in batches(handle, seqs, batch_size):
        logits = forward(handle, ids, mask)
        hit = logits[:, :-1].argmax(-1) == ids[:, 1:]
        out.extend((hit | ~predicts(mask, prefix)).all(-1).tolist())
    return out


@torch.no_grad()
def greedy_continuations(handle: ModelHandle, prompts: list[list[int]], max_new_tokens: int,
                         batch_size: int = 32, desc: str | None = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched with left padding and a KV cache."""
    out = []
    for _, ids, mask in batches(handle, prompts, batch_size, side="left", desc=desc):
        gen = handle.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=handle.tokenizer.pad_token_id, use_cache=True)
        out.extend(gen[:, ids.shape[1]:].tolist())
    return out

