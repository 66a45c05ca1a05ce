"""Every memlens figure: plotly ``Figure``s built from plain tables (DataFrames, dicts of
numbers), never from models or tensors, so a figure can be redrawn from saved results.

Example:
    >>> extraction_figure({"exact": summary["exact_extraction_rate_by_duplication"]}, "Labels")
    >>> layer_sweep_figure(pd.read_parquet("probes/results.parquet"), baselines)
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from memlens.core.sequences import UNKNOWN, sort_keys

GROUPS = ("early", "middle", "late")


def _color(k: int) -> str:
    return qualitative.Plotly[k % len(qualitative.Plotly)]


def _duplication_label(key: str) -> str:
    return "non-member" if key == "0" else key if key == UNKNOWN else f"{key}x"


# --------------------------------------------------------------------------- labels, edits


def extraction_figure(series: dict[str, dict[str, float]], title: str) -> go.Figure:
    """Bars of extraction rate by duplication, one series per name (rates keyed by
    duplication, as in every by-duplication table)."""
    fig = go.Figure()
    for name, rates in series.items():
        keys = sort_keys(rates)
        fig.add_bar(x=[_duplication_label(k) for k in keys],
                    y=[rates[k] for k in keys], name=name,
                    hovertemplate=f"{name}<br>%{{x}}: %{{y:.0%}}<extra></extra>")
    fig.update_layout(title=title, barmode="group", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.05], height=380, xaxis_title="duplication",
                      yaxis_title="share of sequences extracted")
    return fig


# --------------------------------------------------------------------------- curvature


def spectrum_figure(spectra: pd.DataFrame) -> go.Figure:
    """Eigenvalues of A and G per layer (log scale), highest first. ``spectra``: columns
    layer, factor ("A" or "G"), rank, eigenvalue (``memlens.curvature.spectra``)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("A = E[a a^T] (inputs)",
                                                        "G = E[g g^T] (output gradients)"))
    for k, (name, df) in enumerate(spectra.groupby("layer", sort=False)):
        for col, factor in ((1, "A"), (2, "G")):
            part = df[df["factor"] == factor]
            fig.add_scatter(x=part["rank"], y=part["eigenvalue"].clip(lower=1e-12), name=name,
                            legendgroup=name, showlegend=col == 1, mode="lines",
                            line_color=_color(k), row=1, col=col)
    fig.update_yaxes(type="log", title_text="eigenvalue")
    fig.update_xaxes(type="log", title_text="rank")
    fig.update_layout(title="K-FAC factor spectra", height=420)
    return fig


def mass_curve_figure(curves: pd.DataFrame) -> go.Figure:
    """Cumulative curvature mass against the fraction of components kept, highest first.
    ``curves``: columns layer, components, mass (``memlens.curvature.mass_curves``)."""
    fig = go.Figure()
    for k, (name, df) in enumerate(curves.groupby("layer", sort=False)):
        fig.add_scatter(x=df["components"], y=df["mass"], name=name, mode="lines",
                        line_color=_color(k))
    fig.update_layout(title="Curvature mass kept vs components kept",
                      xaxis=dict(title="fraction of components (highest curvature first)",
                                 type="log"),
                      yaxis=dict(title="fraction of curvature mass", range=[0, 1.02]))
    return fig


def loading_figure(loadings: dict[str, pd.DataFrame]) -> go.Figure:
    """Mean loading per curvature bin for groups of tokens, e.g. memorized vs clean."""
    fig = go.Figure()
    for k, (group, df) in enumerate(loadings.items()):
        mean = df.groupby("bin")["loading"].mean()
        fig.add_bar(x=[int(b) for b in mean.index], y=mean.tolist(), name=group,
                    marker_color=_color(k))
    fig.update_layout(title="Where tokens load: components binned by curvature",
                      xaxis=dict(title="curvature bin (0 = highest curvature)", dtick=1),
                      yaxis_title="mean loading (averaged over layers)", barmode="group")
    return fig


def pareto_figure(points: pd.DataFrame, x: str = "perplexity",
                  y: str = "exact_100", baseline_x: float | None = None) -> go.Figure:
    """Extraction against perplexity, one line per method (``points`` has a 'method' column)."""
    fig = go.Figure()
    for k, (method, df) in enumerate(points.groupby("method", sort=False)):
        df = df.sort_values(x)
        fig.add_scatter(x=df[x], y=df[y], name=str(method), mode="lines+markers",
                        line_color=_color(k),
                        text=[f"{p}" for p in df.get("param", [""] * len(df))],
                        hovertemplate="%{text}<br>perplexity %{x:.3f}<br>extraction %{y:.3f}")
    if baseline_x is not None:
        fig.add_vline(x=baseline_x, line_dash="dot", annotation_text="unedited")
        fig.add_vline(x=baseline_x * 1.1, line_dash="dash", annotation_text="+10%")
    fig.update_layout(title="Memorization removal: extraction vs clean perplexity",
                      xaxis_title="perplexity on held-out clean text",
                      yaxis=dict(title="exact extraction rate", range=[-0.02, 1.02]))
    return fig


# --------------------------------------------------------------------------- probes


def layer_sweep_figure(results: pd.DataFrame, baselines: dict, trainer: str = "torch"):
    """AUROC per layer per site kind with 95% CIs, control line and baseline lines.

    ``results`` and ``baselines`` are a :class:`ProbeSweep`'s (or ``results.parquet``
    and ``results.json["token_baselines"]`` of a config run).
    """
    res = results[(results["trainer"] == trainer) & (results["layer"] >= 0)]
    fig = go.Figure()
    for kind, g in res[~res["control"]].groupby("kind"):
        g = g.sort_values("layer")
        fig.add_trace(go.Scatter(
            x=g["layer"], y=g["auroc"], mode="lines+markers", name=kind,
            error_y=dict(type="data", symmetric=False, array=g["auroc_ci_high"] - g["auroc"],
                         arrayminus=g["auroc"] - g["auroc_ci_low"])))
    ctrl = res[res["control"]].groupby("layer")["auroc"].mean()
    fig.add_trace(go.Scatter(x=ctrl.index, y=ctrl.values, mode="lines", name="control task",
                             line=dict(dash="dot", color="grey")))
    span = [res["layer"].min(), res["layer"].max()]
    # Probes on several sites and the model's own confidence: flat lines, named in the legend.
    combos = results[(results["kind"] == "combined") & ~results["control"]
                     & (results["trainer"] == trainer)]
    for _, r in combos.iterrows():
        fig.add_trace(go.Scatter(x=span, y=[r["auroc"]] * 2, mode="lines",
                                 name=f"{r['probe']} ({r['auroc']:.3f})",
                                 line=dict(width=1.5)))
    for name, v in baselines.items():
        if name.startswith("token_"):
            fig.add_trace(go.Scatter(x=span, y=[v] * 2, mode="lines", name=f"{name} ({v:.3f})",
                                     line=dict(dash="dash", width=1, color="black")))
    fig.update_layout(title="Memorized-token probes: held-out AUROC by layer",
                      xaxis=dict(title="layer", dtick=1), yaxis_title="AUROC (95% CI)",
                      yaxis_range=[0.4, 1.01])
    return fig


# --------------------------------------------------------------------------- LayerNorm


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
    s = pd.Series(values, dtype="float64")
    return float(s.mean()), (float(s.std()) if len(values) > 1 else 0.0)


def group_bars_figure(conditions: list[dict]):
    """Bars per removed group (none, early, middle, late): memorization, learning and
    recovery, Pre-LN vs Post-LN, post hoc (top row) and during training (bottom row)."""
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


def audit_heatmap(methods: list[dict]) -> go.Figure:
    """Removal x attack: exact extraction of the forget set after each attack, and the
    membership AUROCs (forget set vs non-members), from :func:`memlens.audit.audit` results
    (each with a ``name``). A removal that forgets matches the retrain-without row."""
    steps = list(methods[0]["relearn"])
    cols = (["after the removal", "INT8", "INT4"] + [f"relearn {k} steps" for k in steps]
            + ["worst perturbed prompt", "membership AUROC (loss)",
               "membership AUROC (neighbourhood)"])
    z, text = [], []
    for m in methods:
        row = [m["after_edit"]["exact"], m.get("int8", {}).get("exact", float("nan")),
               m.get("int4", {}).get("exact", float("nan")),
               *[m["relearn"][k]["exact"] for k in steps], max(m["perturbed"].values()),
               m["mia_auroc"]["loss"], m["mia_auroc"]["neighbourhood"]]
        z.append(row)
        text.append([f"{v:.0%}" for v in row[:-2]] + [f"{v:.2f}" for v in row[-2:]])
    names = [f"{m['name']} (ppl {m['after_edit']['perplexity']:.2f})" for m in methods]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=names, zmin=0, zmax=1, colorscale="Reds", text=text,
        texttemplate="%{text}", colorbar=dict(title="extraction<br>/ AUROC"),
        hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>"))
    fig.update_layout(title="Does the removal forget? Exact extraction of the forget set under "
                      "each attack, and how well membership inference still finds it",
                      yaxis=dict(autorange="reversed", title="removal"),
                      xaxis=dict(title="attack", tickangle=-30),
                      height=160 + 40 * len(methods), width=1200)
    return fig
