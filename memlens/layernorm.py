"""LayerNorm and memorization: parameter removal, gradient attribution, scale statistics.

"Removing" a normalization layer's parameters sets its gain to 1 and its bias to 0 and keeps
the normalization ``(x - mean) / std``. It is done post hoc on a trained model
(:func:`remove_norm_params`, reversible) or from the start of training
(``train_organism(..., norm_free_layers=...)``, which calls :func:`freeze_norm_params`).
Everything here uses plain PyTorch hooks on the HF modules, so it runs on Post-LN decoders
that TransformerLens' bridge cannot wrap.

Example:
    >>> groups = layer_groups(handle.n_layers)              # {"early": [0, 1], ...}
    >>> with remove_norm_params(handle, groups["early"]):
    ...     print(edit_metrics(handle, members, heldout_ids, cfg))
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memlens.edits import WeightEdit, tracking_gradients
from memlens.labels import LabelConfig, Sequence, read_sequences
from memlens.models import ModelHandle

GROUPS = ("early", "middle", "late")


def layer_groups(n_layers: int) -> dict[str, list[int]]:
    """Blocks split into early, middle and late thirds (the first thirds get the remainder)."""
    if n_layers < 3:
        raise ValueError(f"a model with {n_layers} blocks cannot be split into early, middle "
                         "and late thirds; use one with at least 3 blocks (preset 'tiny-deep')")
    chunks = torch.arange(n_layers).tensor_split(3)
    return {name: chunk.tolist() for name, chunk in zip(GROUPS, chunks, strict=True)}


def block_path(model: torch.nn.Module) -> str:
    """Module path of the decoder's list of blocks (``model.layers``, ``transformer.h``...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name
    raise ValueError(f"{type(model).__name__} has no list of {n} blocks")


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None


def norm_modules(model: torch.nn.Module, layers: list[int] | tuple[int, ...] | None = None
                 ) -> dict[str, torch.nn.Module]:
    """The normalization layers inside blocks ``layers`` (every block when None), by path.

    The final norm after the last block belongs to no block and is never included.
    """
    root = block_path(model)
    n = model.config.num_hidden_layers
    layers = range(n) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"blocks {bad} do not exist; the model has blocks 0..{n - 1}")
    found = {}
    for i in layers:
        prefix = f"{root}.{i}"
        for name, module in model.get_submodule(prefix).named_modules():
            if _is_norm(module):
                found[f"{prefix}.{name}"] = module
    return found


def _identity_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {"weight": torch.ones_like(module.weight)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = torch.zeros_like(module.bias)
    return out


@torch.no_grad()
def freeze_norm_params(model: torch.nn.Module, layers: tuple[int, ...]) -> list[str]:
    """Set the norms of blocks ``layers`` to gain 1, bias 0 and stop them training."""
    names = []
    for path, module in norm_modules(model, layers).items():
        for pname, value in _identity_params(module).items():
            param = getattr(module, pname)
            param.copy_(value)
            param.requires_grad_(False)
            names.append(f"{path}.{pname}")
    return names


def remove_norm_params(handle: ModelHandle, layers: list[int] | tuple[int, ...]) -> WeightEdit:
    """Gain 1 and bias 0 for the norms of blocks ``layers``: a :class:`WeightEdit`, so use it
    in a ``with`` block (or call ``restore()``) to get the trained parameters back."""
    edit = WeightEdit(handle)
    try:
        for path, module in norm_modules(handle.model, layers).items():
            for pname, value in _identity_params(module).items():
                edit.set(f"{path}.{pname}", value)
    except BaseException:
        edit.restore()
        raise
    return edit


# --------------------------------------------------------------------------- attribution


def _capture_inputs(modules: dict[str, torch.nn.Module], store: dict[str, torch.Tensor]):
    def make(name):
        def hook(mod, args):
            store[name] = args[0]
        return hook
    return [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]


def _scale(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The divisor a LayerNorm (centred) or RMSNorm (not centred) applies to ``x``."""
    x = x.float()
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5))
    spread = x.pow(2).mean() if "rms" in type(module).__name__.lower() else x.var(unbiased=False)
    return (spread + eps).sqrt()


def norm_attribution(handle: ModelHandle, token_ids: list[list[int]],
                     targets: list[list[int]], progress: bool = False
                     ) -> dict[str, torch.Tensor]:
    """Per target token and per block normalization layer: the gradient norm at its input and
    its scale.

    ``targets[i]`` lists positions ``t`` of sequence ``i``; each stands for the prediction of
    token ``t`` (made at position ``t - 1``). Returns ``grad_norm`` and ``scale``, each
    [n_targets, n_norms] in the order of :func:`norm_modules`, with ``names`` and
    ``output_grad_norm`` [n_targets]:

    - grad_norm: ``||d loss_t / d x||`` with ``x`` the layer's input at every position, one
      backward pass per token (the loss of one token, not a sum that mixes tokens);
    - output_grad_norm: ``||d loss_t / d logits||``, the error the token sends back (small for
      tokens predicted with confidence), to compare layers per unit of error;
    - scale: ``sqrt(var(x) + eps)`` at position ``t - 1``, the divisor the layer applies
      (TransformerLens' ``hook_scale``).
    """
    modules = norm_modules(handle.model)
    names = list(modules)
    grads, scales, errors = [], [], []
    store: dict[str, torch.Tensor] = {}
    hooks = _capture_inputs(modules, store)
    try:
        with tracking_gradients(handle.model, params=[]):
            for ids_list, positions in tqdm(list(zip(token_ids, targets, strict=True)),
                                            desc="LayerNorm attribution", unit="seq",
                                            disable=not progress):
                if not positions:
                    continue
                ids = torch.tensor([ids_list], device=handle.device)
                embeds = handle.model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = handle.model(inputs_embeds=embeds).logits[0].float()
                inputs = [store[n] for n in names]
                # OPT's MLP norm sees [batch * pos, d]: view every input as [pos, d].
                flat = [x.detach().reshape(len(ids_list), -1) for x in inputs]
                logp = logits.log_softmax(-1)
                for t in positions:
                    loss = -logp[t - 1, ids_list[t]]
                    g = torch.autograd.grad(loss, inputs, retain_graph=True)
                    grads.append(torch.stack([x.float().norm() for x in g]))
                    # d loss / d logits = softmax - onehot: the error the token sends back.
                    err = logp[t - 1].detach().exp()
                    err[ids_list[t]] -= 1
                    errors.append(err.norm())
                    scales.append(torch.stack([_scale(modules[n], x[t - 1])
                                               for n, x in zip(names, flat, strict=True)]))
                store.clear()
    finally:
        for h in hooks:
            h.remove()
    if not grads:
        raise ValueError("no target positions given; pass at least one position >= 1")
    return {"names": names, "grad_norm": torch.stack(grads), "scale": torch.stack(scales),
            "output_grad_norm": torch.stack(errors)}


# --------------------------------------------------------------------------- recovery


def _pii_field(seq: Sequence, pos: int) -> str | None:
    s, e = seq.offsets[pos]
    for sp in seq.spans:
        if s < sp.end and e > sp.start and e > s:
            return sp.field
    return None


def field_vocabulary(seqs: list[Sequence]) -> dict[str, set[int]]:
    """Per PII field, every token id seen inside that field's values in ``seqs``.

    Built from records other than the memorized ones, it is the set of plausible generic
    tokens for a field: what a model that learned the format but not the record may say.
    """
    vocab: dict[str, set[int]] = {}
    for seq in seqs:
        _require_spans(seq)
        for pos, tok in enumerate(seq.token_ids):
            fld = _pii_field(seq, pos)
            if fld is not None:
                vocab.setdefault(fld, set()).add(tok)
    return vocab


def _require_spans(seq: Sequence) -> None:
    if seq.spans is None or seq.offsets is None:
        raise ValueError(f"sequence {seq.id!r} has no PII spans or token offsets; read it "
                         "with read_sequences from an organism's corpus.jsonl (it needs text "
                         "and spans)")


def memorized_pii_positions(handle: ModelHandle, seqs: list[Sequence],
                            cfg: LabelConfig | None = None) -> list[list[int]]:
    """Per sequence, the suffix positions of PII tokens the model reproduces, in sequences it
    extracts exactly (the tokens labelled ``memorized``)."""
    from memlens.labels import label

    cfg = replace(cfg or LabelConfig(), generate=False)
    tokens = label(handle, seqs, cfg, progress=False).tokens
    hits = tokens[tokens["label"] == "memorized"].groupby("id")["position"].apply(list)
    return [sorted(hits.get(s.id, [])) for s in seqs]


@torch.no_grad()
def recovery(handle: ModelHandle, seqs: list[Sequence], positions: list[list[int]],
             vocab: dict[str, set[int]]) -> dict[str, float]:
    """Where memorized PII tokens go under the current weights (teacher forcing).

    Each position of ``positions`` (memorized PII tokens, e.g. from the unedited model via
    :func:`memorized_pii_positions`) is, by the model's top-1 prediction now:

    - ``kept``: still the memorized token;
    - ``recovered``: another token of the same field's generic vocabulary (``vocab``, from
      :func:`field_vocabulary` on records the model saw once): it fell back to a plausible
      value of the right kind, the analogue of predicting the true label;
    - ``lost``: anything else.

    Returns the three shares (they sum to 1), ``memorized_loss`` (mean -log p of the memorized
    tokens: memorization as a continuous measure) and ``n``.
    """
    counts = {"kept": 0, "recovered": 0, "lost": 0}
    loss = 0.0
    for seq, pos in zip(seqs, positions, strict=True):
        if not pos:
            continue
        _require_spans(seq)
        ids = torch.tensor([seq.token_ids[:max(pos) + 1]], device=handle.device)
        logp = handle.model(input_ids=ids).logits[0].float().log_softmax(-1)
        top = logp.argmax(-1).tolist()
        for t in pos:
            pred, gold = top[t - 1], seq.token_ids[t]
            loss -= logp[t - 1, gold].item()
            fld = _pii_field(seq, t)
            key = ("kept" if pred == gold else
                   "recovered" if pred in vocab.get(fld, ()) else "lost")
            counts[key] += 1
    n = sum(counts.values())
    if n == 0:
        raise ValueError("no memorized PII positions given; the model recites no PII token "
                         "of these sequences")
    return {**{k: v / n for k, v in counts.items()}, "memorized_loss": loss / n, "n": n}


# --------------------------------------------------------------------------- the study


@dataclass
class StudyData:
    """What each condition is scored on: an organism's canaries (memorization), held-out
    records (learning) and the generic PII vocabulary of its once-seen records (recovery)."""

    canaries: list[Sequence]
    heldout: list[Sequence]
    vocab: dict[str, set[int]]

    @classmethod
    def from_organism(cls, path: str | Path, tokenizer) -> StudyData:
        corpus = Path(path) / "corpus.jsonl"
        return cls(read_sequences(corpus, tokenizer, roles=("canary",)),
                   read_sequences(corpus, tokenizer, roles=("nonmember",)),
                   field_vocabulary(read_sequences(corpus, tokenizer, roles=("general",))))


def condition_metrics(handle: ModelHandle, data: StudyData, pii_positions: list[list[int]],
                      cfg: LabelConfig | None = None, min_duplication: int = 10,
                      max_len: int | None = None) -> dict:
    """Memorization, learning and recovery of the model as it is now.

    - ``exact_extraction_rate`` / ``loose_extraction_rate``: over canaries repeated at least
      ``min_duplication`` times (and ``*_by_duplication``);
    - ``heldout_loss`` / ``heldout_accuracy``: next-token loss and accuracy on the template
      (non-PII) tokens of held-out records: the format the model learned, not memorized;
    - ``recovery``: :func:`recovery` of ``pii_positions`` (memorized by the reference model).
    """
    from memlens.edits import exact_extraction, loose_extraction
    from memlens.organism import heldout_metrics

    cfg = cfg or LabelConfig()
    dups = [s.duplication for s in data.canaries]
    flags = {"exact": exact_extraction(handle, data.canaries, cfg),
             "loose": loose_extraction(handle, data.canaries, cfg)}

    def rate(hits, keep):
        chosen = [h for h, d in zip(hits, dups, strict=True) if keep(d)]
        return sum(chosen) / len(chosen)

    out = {}
    for kind, hits in flags.items():
        out[f"{kind}_extraction_rate"] = rate(hits, lambda d: d >= min_duplication)
        out[f"{kind}_by_duplication"] = {str(k): rate(hits, lambda d, k=k: d == k)
                                         for k in sorted(set(dups))}
    learn = heldout_metrics(handle.model, data.heldout, handle.tokenizer, max_len)
    out.update(heldout_loss=learn["heldout_template_loss"],
               heldout_accuracy=learn["heldout_template_accuracy"],
               heldout_all_loss=learn["heldout_all_loss"],
               recovery=recovery(handle, data.canaries, pii_positions, data.vocab))
    return out


def attribution_targets(data: StudyData, pii_positions: list[list[int]],
                        cfg: LabelConfig | None = None, n: int = 300, seed: int = 0
                        ) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Token sets for :func:`norm_attribution`: ``memorized`` (memorized PII tokens of the
    canaries) and ``clean`` (template tokens of held-out records in the same suffix window),
    ``n`` of each drawn at random; each as (token ids, target positions) per sequence."""
    cfg = cfg or LabelConfig()
    memorized = [(i, t) for i, pos in enumerate(pii_positions) for t in pos]
    clean = [(i, t) for i, seq in enumerate(data.heldout)
             for t in range(cfg.prefix, min(len(seq.token_ids), cfg.prefix + cfg.suffix))
             if _pii_field(seq, t) is None]
    rng = random.Random(seed)
    sets = {}
    for kind, pairs, seqs in (("memorized", memorized, data.canaries),
                              ("clean", clean, data.heldout)):
        by_seq: dict[int, list[int]] = {}
        for i, t in sorted(rng.sample(pairs, min(n, len(pairs)))):
            by_seq.setdefault(i, []).append(t)
        sets[kind] = ([seqs[i].token_ids for i in by_seq], list(by_seq.values()))
    return sets


def attribution_table(memorized: dict, clean: dict) -> list[dict]:
    """One row per normalization layer from two :func:`norm_attribution` results: mean gradient
    norm and scale over memorized vs clean tokens, and their ratios (memorized / clean).

    ``grad_per_error_ratio`` compares the gradient per unit of output error
    (``grad_norm / output_grad_norm``): how strongly each kind of token's prediction hangs on
    the layer, with the difference in loss taken out.
    """
    rows = []
    for j, name in enumerate(memorized["names"]):
        gm, gc = memorized["grad_norm"][:, j], clean["grad_norm"][:, j]
        um = gm / memorized["output_grad_norm"].clamp_min(1e-12)
        uc = gc / clean["output_grad_norm"].clamp_min(1e-12)
        sm, sc = memorized["scale"][:, j], clean["scale"][:, j]
        parts = name.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        rows.append(dict(
            module=name, layer=layer, norm=parts[-1],
            grad_memorized=gm.mean().item(), grad_clean=gc.mean().item(),
            grad_ratio=(gm.mean() / gc.mean()).item(),
            grad_per_error_ratio=(um.mean() / uc.mean()).item(),
            scale_memorized=sm.mean().item(), scale_memorized_std=sm.std().item(),
            scale_clean=sc.mean().item(), scale_clean_std=sc.std().item(),
            scale_ratio=(sm.mean() / sc.mean()).item(),
            n_memorized=len(gm), n_clean=len(gc)))
    return rows


# --------------------------------------------------------------------------- figures

# Figures take the study's rows (dicts, as in experiments/results/layernorm_study.json).
_PANELS = (("exact_extraction_rate", "memorization: exact extraction"),
           ("memorized_loss", "memorization: memorized-PII loss"),
           ("heldout_loss", "learning: template loss"),
           ("recovery", "recovery: PII -> generic"))
_KIND_COLORS = {"Pre-LN": "#1f77b4", "Post-LN": "#d62728", "Pre-RMSNorm (llama)": "#2ca02c"}


def _value(row: dict, key: str) -> float:
    if key == "recovery":
        return row["recovery"]["recovered"]
    if key == "memorized_loss":
        return row["recovery"]["memorized_loss"]
    return row[key]


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def group_bars_figure(conditions: list[dict]):
    """Bars per removed group (none, early, middle, late): memorization, learning and
    recovery, Pre-LN vs Post-LN, post hoc (top row) and during training (bottom row)."""
    from plotly.subplots import make_subplots

    whens = {"posthoc": "removed post hoc", "training": "removed during training"}
    fig = make_subplots(rows=2, cols=len(_PANELS), subplot_titles=[t for _, t in _PANELS],
                        vertical_spacing=0.12)
    kinds = sorted({c["layernorm"] for c in conditions}, reverse=True)
    x = ["none", *GROUPS]
    for r, when in enumerate(whens, 1):
        for col, (key, _) in enumerate(_PANELS, 1):
            for kind in kinds:
                stats = [_mean_std([_value(c, key) for c in conditions
                                    if c["layernorm"] == kind and c["when"] == when
                                    and c["removed_group"] == g] or [float("nan")]) for g in x]
                fig.add_bar(x=x, y=[m for m, _ in stats], name=kind,
                            marker_color=_KIND_COLORS.get(kind),
                            error_y=dict(array=[s for _, s in stats]),
                            legendgroup=kind, showlegend=r == 1 and col == 1, row=r, col=col,
                            hovertemplate=f"{kind}<br>removed %{{x}}<br>%{{y:.3f}}<extra></extra>")
        fig.update_yaxes(title_text=whens[when], row=r, col=1)
    fig.update_layout(barmode="group", height=650, width=1400,
                      title="LayerNorm parameters removed per group of blocks: memorization, "
                      "learning, recovery")
    return fig


def gradient_ratio_figure(attribution: list[dict]):
    """Per block: gradient norm at each LayerNorm's input, memorized / clean tokens, raw and
    per unit of output error, and the ratio of the LayerNorm scales; one line per
    architecture and norm."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = (("grad_ratio", "gradient norm at LayerNorm input: memorized / clean"),
              ("grad_per_error_ratio", "the same per unit of output error"),
              ("scale_ratio", "LayerNorm scale (hook_scale): memorized / clean"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels])
    lines = sorted({(a["layernorm"], a["norm"]) for a in attribution}, reverse=True)
    palette = ("#1f77b4", "#17becf", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd")
    for (kind, norm), color in zip(lines, palette * len(lines), strict=False):
        rows = [a for a in attribution if a["layernorm"] == kind and a["norm"] == norm]
        layers = sorted({a["layer"] for a in rows})
        for col, (key, _) in enumerate(panels, 1):
            y = [_mean_std([a[key] for a in rows if a["layer"] == n])[0] for n in layers]
            fig.add_trace(go.Scatter(
                x=layers, y=y, mode="lines+markers", name=f"{kind} {norm}",
                legendgroup=f"{kind} {norm}", showlegend=col == 1,
                line=dict(color=color, dash="solid" if kind.startswith("Pre") else "dash"),
                hovertemplate=f"{kind} {norm}<br>block %{{x}}<br>%{{y:.3f}}<extra></extra>"),
                row=1, col=col)
    fig.add_hline(y=1, line_color="gray", line_dash="dot")
    fig.update_xaxes(title_text="block", dtick=1)
    fig.update_layout(height=420, width=1400, title="Where memorized tokens pull on LayerNorm")
    return fig


_HEAT = (("exact_extraction_rate", "exact extraction"), ("loose_extraction_rate", "loose"),
         ("memorized_loss", "memorized PII loss"),
         ("heldout_loss", "template loss"), ("heldout_accuracy", "template accuracy"),
         ("recovery", "recovery"))


def layer_heatmap_figure(conditions: list[dict]):
    """Block x metric: each metric when one block's LayerNorm parameters are removed post hoc
    (text: the value; colour: the change relative to the unedited model)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = sorted({c["layernorm"] for c in conditions}, reverse=True)
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True)
    singles = [c for c in conditions if c["when"] == "posthoc"
               and c["removed_group"].startswith("layer")]
    layers = sorted({c["removed_layers"][0] for c in singles})

    def mean_of(kind, key, pred):
        return _mean_std([_value(c, key) for c in conditions
                          if c["layernorm"] == kind and pred(c)] or [float("nan")])[0]

    deltas, relative, texts = {}, {}, {}
    for kind in kinds:
        base = {k: mean_of(kind, k, lambda c: c["when"] == "posthoc"
                           and c["removed_group"] == "none") for k, _ in _HEAT}
        vals = [[mean_of(kind, k, lambda c, n=n: c in singles and c["removed_layers"] == [n])
                 for k, _ in _HEAT] for n in layers]
        deltas[kind] = [[v - base[k] for v, (k, _) in zip(row, _HEAT, strict=True)]
                        for row in vals]
        # Relative change, with a floor so that metrics near 0 (recovery) do not blow up.
        relative[kind] = [[max(-1.0, min(1.0, d / max(abs(base[k]), 0.05)))
                           for d, (k, _) in zip(row, _HEAT, strict=True)]
                          for row in deltas[kind]]
        texts[kind] = [[f"{v:.2f}" for v in row] for row in vals]
    for col, kind in enumerate(kinds, 1):
        fig.add_trace(go.Heatmap(
            z=relative[kind], x=[t for _, t in _HEAT], y=[f"block {n}" for n in layers],
            zmin=-1, zmax=1, colorscale="RdBu_r", text=texts[kind], texttemplate="%{text}",
            customdata=deltas[kind], showscale=col == len(kinds),
            colorbar=dict(title="relative<br>change"),
            hovertemplate="%{y}, %{x}: %{text} (change %{customdata:+.3f})<extra></extra>"),
            row=1, col=col)
    fig.update_layout(height=120 + 45 * len(layers), width=1400,
                      title="One block's LayerNorm parameters removed post hoc: value per "
                      "metric, coloured by the change relative to the unedited model "
                      "(clipped at ±100%)")
    return fig
