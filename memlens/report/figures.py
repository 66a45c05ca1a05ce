"""Every memlens figure: plotly ``Figure``s built from plain tables (DataFrames, dicts of
numbers), never from models or tensors, so a figure can be redrawn from saved results.

Example:
    >>> extraction_figure({"exact": labels.extraction.exact}, "Labels")
    >>> layer_sweep_figure(pd.read_parquet("probes/results.parquet"), baselines)
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative, sample_colorscale
from plotly.subplots import make_subplots

from memlens.core.sequences import UNKNOWN, sort_keys

__all__ = ["GROUPS", "LABEL_COLORS", "audit_heatmap", "calibration_figure", "duplication_label",
           "extraction_figure", "gradient_ratio_figure", "group_bars_figure", "label_tint",
           "layer_heatmap_figure", "layer_sweep_figure", "loading_figure", "logprob_histogram",
           "mass_curve_figure", "neuron_score_figure", "pareto_figure", "spectrum_figure",
           "use_notebook_renderer"]

GROUPS = ("early", "middle", "late")

# One colour per memorization label (labels.py's names) in every figure and token view.
LABEL_COLORS = {"memorized": "#d62728", "partial": "#ff7f0e", "not_memorized": "#1f77b4",
                "generic": "#7f7f7f", "excluded": "#ffffff"}


def label_tint(label: str, alpha: float = 0.35) -> str:
    """A label's colour as a light background (for token text)."""
    color = LABEL_COLORS.get(label, LABEL_COLORS["excluded"])
    if color == LABEL_COLORS["excluded"]:
        return "transparent"
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


def _color(k: int, n: int = 10) -> str:
    """Distinct colours for up to 10 series; past that, an ordered scale (layers, blocks)."""
    if n <= len(qualitative.Plotly):
        return qualitative.Plotly[k % len(qualitative.Plotly)]
    return sample_colorscale("Turbo", [0.05 + 0.9 * k / max(1, n - 1)])[0]


def duplication_label(key) -> str:
    """'100' -> '100x', '0' -> 'non-member': a by-duplication key as a reader sees it."""
    key = str(key)
    return "non-member" if key == "0" else key if key == UNKNOWN else f"{key}x"


# --------------------------------------------------------------------------- notebooks


def use_notebook_renderer(name: str = "memlens") -> str:
    """Register and select a plotly renderer whose figures JupyterLab draws (plotly's
    mimetype) and an exported notebook keeps (HTML, no CDN, no MathJax). Returns the
    plotly.js ``<script>`` that page needs once: display it (``memlens.report.notebook.setup``)."""
    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer
    from plotly.offline import get_plotlyjs

    class Renderer(MimetypeRenderer):
        def to_mimebundle(self, fig_dict):
            bundle = PlotlyRenderer(config={"responsive": True}).to_mimebundle(dict(fig_dict))
            bundle["text/html"] = pio.to_html(
                fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                default_width="100%", config={"responsive": True}, validate=False)
            return bundle

    pio.renderers[name] = Renderer()
    pio.renderers.default = name
    return f"<script type='text/javascript'>{get_plotlyjs()}</script>"


# --------------------------------------------------------------------------- labels, edits


def extraction_figure(series: dict[str, dict[str, float]], title: str) -> go.Figure:
    """Bars of extraction rate by duplication, one series per name (rates keyed by
    duplication, as in every by-duplication table)."""
    fig = go.Figure()
    for name, rates in series.items():
        keys = sort_keys(rates)
        fig.add_bar(x=[duplication_label(k) for k in keys],
                    y=[rates[k] for k in keys], name=name,
                    hovertemplate=f"{name}<br>%{{x}}: %{{y:.0%}}<extra></extra>")
    fig.update_layout(title=title, barmode="group", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.05], height=380, xaxis_title="duplication",
                      yaxis_title="share of sequences extracted")
    return fig


# --------------------------------------------------------------------------- curvature


def spectrum_figure(spectra: pd.DataFrame) -> go.Figure:
    """Eigenvalues of A and G per layer (log scale), highest first. ``spectra``: columns
    layer, factor ("A" or "G"), rank, eigenvalue (``memlens.methods.curvature.spectra``)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("A = E[a a^T] (inputs)",
                                                        "G = E[g g^T] (output gradients)"))
    n = spectra["layer"].nunique()
    for k, (name, df) in enumerate(spectra.groupby("layer", sort=False)):
        for col, factor in ((1, "A"), (2, "G")):
            part = df[df["factor"] == factor]
            fig.add_scatter(x=part["rank"], y=part["eigenvalue"].clip(lower=1e-12), name=name,
                            legendgroup=name, showlegend=col == 1, mode="lines",
                            line_color=_color(k, n), row=1, col=col)
    fig.update_yaxes(type="log", title_text="eigenvalue")
    fig.update_xaxes(type="log", title_text="rank")
    fig.update_layout(title="K-FAC factor spectra", height=420)
    return fig


def mass_curve_figure(curves: pd.DataFrame) -> go.Figure:
    """Cumulative curvature mass against the fraction of components kept, highest first.
    ``curves``: columns layer, components, mass (``memlens.methods.curvature.mass_curves``)."""
    fig = go.Figure()
    n = curves["layer"].nunique()
    for k, (name, df) in enumerate(curves.groupby("layer", sort=False)):
        fig.add_scatter(x=df["components"], y=df["mass"], name=name, mode="lines",
                        line_color=_color(k, n))
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
        color = (LABEL_COLORS["memorized"] if group.startswith("memorized")
                 else LABEL_COLORS["not_memorized"] if k == 1 else _color(k))
        fig.add_bar(x=[int(b) for b in mean.index], y=mean.tolist(), name=group,
                    marker_color=color)
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
    """Held-out AUROC per layer and site kind (95% CIs), beside the confidence probe (a probe
    on the model's own max log-prob and entropy): left on all tokens, right on tokens matched
    for that confidence, where only what the residual stream adds beyond it can score.

    ``results`` and ``baselines`` are a :class:`ProbeSweep`'s (or ``results.parquet``
    and ``results.json["token_baselines"]`` of a config run).
    """
    res = results[results["trainer"] == trainer]
    layered = res[res["layer"] >= 0]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("all held-out tokens",
                                        "tokens matched for the model's confidence"))
    span = [layered["layer"].min(), layered["layer"].max()]
    for k, (kind, g) in enumerate(layered[~layered["control"]].groupby("kind")):
        g = g.sort_values("layer")
        for col, key in ((1, "auroc"), (2, "matched_auroc")):
            err = (dict(type="data", symmetric=False, array=g["auroc_ci_high"] - g["auroc"],
                        arrayminus=g["auroc"] - g["auroc_ci_low"]) if key == "auroc" else None)
            fig.add_scatter(x=g["layer"], y=g[key], mode="lines+markers", name=kind,
                            legendgroup=kind, showlegend=col == 1, error_y=err,
                            line_color=_color(k), row=1, col=col)
    plain = ~layered["kind"].str.contains("+", regex=False)  # one site, no combination
    ctrl = layered[layered["control"] & plain].groupby("layer")["auroc"].mean()
    fig.add_scatter(x=ctrl.index, y=ctrl.values, mode="lines", name="control task",
                    line=dict(dash="dot", color="grey"), row=1, col=1)
    # Probes on several sites and on the confidence alone: flat lines, named with their value.
    flat = res[res["kind"].isin(["combined", "confidence", "lens"]) & ~res["control"]]
    for k, (_, r) in enumerate(flat.iterrows()):
        confidence = r["kind"] == "confidence"
        line = (dict(color=LABEL_COLORS["memorized"], dash="dash", width=3) if confidence
                else dict(color=_color(k + 3), width=1.5))
        what = "confidence probe (max log-prob, entropy)" if confidence else r["probe"]
        for col, key in ((1, "auroc"), (2, "matched_auroc")):
            fig.add_scatter(x=span, y=[r[key]] * 2, mode="lines", line=line,
                            name=f"{what}: {r['auroc']:.3f} / matched {r['matched_auroc']:.3f}",
                            legendgroup=what, showlegend=col == 1, row=1, col=col)
    for name, v in baselines.items():
        if name.startswith("token_"):
            fig.add_scatter(x=span, y=[v] * 2, mode="lines", name=f"{name} ({v:.3f})",
                            line=dict(dash="dot", width=1, color="black"), row=1, col=1)
    fig.add_hline(y=0.5, line_color="lightgrey", row=1, col=2)
    fig.update_xaxes(title_text="layer (block)", dtick=max(1, (span[1] - span[0]) // 10))
    fig.update_yaxes(title_text="AUROC, memorized vs other tokens (95% CI)", range=[0.3, 1.01],
                     row=1, col=1)
    fig.update_layout(title="Memorized-token probes by layer<br><sup>and what the residual "
                      "stream knows beyond the model's confidence</sup>", height=520,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def logprob_histogram(tokens: pd.DataFrame) -> go.Figure:
    """Log-probability of the labeled tokens, one colour per memorization label."""
    fig = go.Figure()
    for label, color in LABEL_COLORS.items():
        part = tokens[tokens["label"] == label]
        if len(part):
            fig.add_histogram(x=part["logprob"], name=f"{label} ({len(part)})", nbinsx=60,
                              marker_color=color, opacity=0.6)
    fig.update_layout(barmode="overlay", title="Token log-probability by memorization label",
                      xaxis_title="log-probability of the true token (nats)",
                      yaxis_title="tokens", height=380)
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
    fig.update_xaxes(title_text="blocks whose LayerNorm was removed", row=2)
    fig.update_layout(barmode="group", height=650,
                      title="LayerNorm parameters removed per group of blocks<br><sup>"
                      "memorization, learning, recovery</sup>")
    return fig


def gradient_ratio_figure(attribution: list[dict]):
    """Per block: gradient norm at each LayerNorm's input, memorized / clean tokens, raw and
    per unit of output error, and the ratio of the LayerNorm scales; one line per
    architecture and norm."""
    panels = (("grad_ratio", "gradient norm at the input"),
              ("grad_per_error_ratio", "the same per unit of<br>output error"),
              ("scale_ratio", "LayerNorm scale<br>(hook_scale)"))
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
    fig.update_yaxes(title_text="memorized / clean (1 = no difference)", row=1, col=1)
    fig.update_layout(height=480, title="Where memorized tokens pull on LayerNorm: ratios "
                      "per block", legend=dict(orientation="h", y=-0.25))
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
    fig.update_xaxes(title_text="metric")
    fig.update_yaxes(title_text="LayerNorm removed in", col=1)
    fig.update_layout(height=160 + 45 * len(layers),
                      title="One block's LayerNorm parameters removed post hoc<br><sup>value "
                      "per metric, coloured by the change relative to the unedited model "
                      "(clipped at ±100%)</sup>")
    return fig


def audit_heatmap(methods: list[dict]) -> go.Figure:
    """Removal x attack: exact extraction of the forget set after each attack, and the
    membership AUROCs (forget set vs non-members), from :func:`memlens.methods.audit.audit` results
    (each with a ``name``). A removal that forgets matches the retrain-without row."""
    steps = list(methods[0]["relearn"])
    mia = methods[0].get("mia_auroc") is not None  # None: no non-members to score against
    cols = (["after the removal", "INT8", "INT4"] + [f"relearn {k} steps" for k in steps]
            + ["worst perturbed prompt"]
            + (["membership AUROC (loss)", "membership AUROC (neighbourhood)"] if mia else []))
    z, text = [], []
    for m in methods:
        row = [m["after_edit"]["exact"], m.get("int8", {}).get("exact", float("nan")),
               m.get("int4", {}).get("exact", float("nan")),
               *[m["relearn"][k]["exact"] for k in steps], max(m["perturbed"].values())]
        aurocs = [m["mia_auroc"]["loss"], m["mia_auroc"]["neighbourhood"]] if mia else []
        z.append(row + aurocs)
        text.append([f"{v:.0%}" for v in row] + [f"{v:.2f}" for v in aurocs])
    names = [f"{m['name']} (ppl {m['after_edit']['perplexity']:.2f})" for m in methods]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=names, zmin=0, zmax=1, colorscale="Reds", text=text,
        texttemplate="%{text}", colorbar=dict(title="extraction<br>/ AUROC"),
        hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>"))
    fig.update_layout(title="Does the removal forget?<br><sup>Exact extraction of the forget "
                      "set under each attack, and how well membership inference still finds "
                      "it</sup>",
                      yaxis=dict(autorange="reversed", title="removal"),
                      xaxis=dict(title="attack", tickangle=-30),
                      height=200 + 40 * len(methods))
    return fig


def neuron_score_figure(scores, title: str) -> go.Figure:
    """A heatmap of a score per MLP neuron ([blocks, neurons])."""
    fig = go.Figure(go.Heatmap(z=scores, colorscale="Viridis", colorbar=dict(title="score"),
                               hovertemplate="block %{y}, neuron %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="neuron", yaxis_title="block", height=300)
    return fig


def calibration_figure(curve: list[dict], budget: float, target: float,
                       chosen: dict | None, what: str) -> go.Figure:
    """The settings a method was chosen from, on the calibration half: the share of recited
    sequences each removes against the rise in clean perplexity it costs, one line per
    family (``curve`` rows: family, setting, removed, perplexity_change), the utility budget
    and the target as lines, the chosen setting circled."""
    fig = go.Figure()
    families = list(dict.fromkeys(c["family"] for c in curve))
    for k, fam in enumerate(families):
        pts = [c for c in curve if c["family"] == fam]
        fig.add_scatter(x=[c["perplexity_change"] for c in pts], y=[c["removed"] for c in pts],
                        mode="lines+markers", name=fam, marker_color=_color(k, len(families)),
                        text=[c["setting"] for c in pts],
                        hovertemplate="%{text}<br>perplexity %{x:+.1%}<br>removed "
                                      "%{y:.0%}<extra></extra>")
    if chosen is not None:
        fig.add_scatter(x=[chosen["perplexity_change"]], y=[chosen["removed"]], mode="markers",
                        name="chosen", marker=dict(size=16, symbol="circle-open", color="black",
                                                   line=dict(width=2)),
                        hovertemplate=f"chosen: {chosen['setting']}<extra></extra>")
    fig.add_vline(x=budget, line_dash="dash", annotation_text="utility budget")
    fig.add_hline(y=target, line_dash="dot", annotation_text="target")
    fig.update_layout(title=f"{what}: the settings it was chosen from (calibration half)",
                      xaxis_title="rise in clean perplexity", xaxis_tickformat="+.0%",
                      xaxis_type="linear", yaxis_title="recited sequences no longer recited",
                      yaxis_tickformat=".0%", yaxis_range=[-0.05, 1.05], height=400)
    return fig
