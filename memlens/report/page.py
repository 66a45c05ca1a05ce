"""One self-contained, offline HTML page of sections: prose, plotly figures, tables, tokens.

plotly.js is embedded once, so the page works without a network. Every piece of text that
comes from a model or from data (token text, table cells, generations) is HTML-escaped.

Example:
    >>> report = Report("memlens demo")
    >>> sec = report.section("Labels", "Which canaries the model recites.")
    >>> sec.figure(fig)
    >>> sec.html(token_view(rows))
    >>> report.write("memlens-demo/report.html")
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memlens.report.figures import LABEL_COLORS, label_tint

__all__ = ["Report", "Section", "labeled_sequence", "text_columns", "token_view"]

# The page from 800 px to wide screens: one centred column, tables scroll inside it.
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1280px;
       padding: 0 24px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
section { margin-bottom: 2.5em; } .prose { max-width: 60em; line-height: 1.45; }
.finding { max-width: 60em; line-height: 1.45; background: #f4f6f8; padding: 0.5em 0.8em;
           border-left: 3px solid #1f77b4; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table.dataframe { border-collapse: collapse; font-size: 0.9em; margin: 0.8em 0; }
table.dataframe td, table.dataframe th { border: 1px solid #ddd; padding: 3px 8px;
                                          vertical-align: top; }
table.dataframe th { text-align: left; }
"""

# token_view's own styles, so that it renders alike in the report, JupyterLab and exported
# notebooks. Label colours are also inline: they survive an HTML sanitizer that drops <style>.
_TOKEN_STYLE = """<style>
.memlens-tokens { font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 1.9; }
.memlens-tokens .seq-title { font-family: system-ui, sans-serif; }
.memlens-tokens span.tok { white-space: pre-wrap; border-radius: 2px; padding: 1px 0; }
.memlens-tokens.by-probe span.tok { background-color: var(--probe) !important; }
</style>"""


def text_columns(df: pd.DataFrame) -> list:
    """The columns that hold text (or other objects), whichever pandas string dtype."""
    return [c for c in df.columns
            if df[c].dtype == object or pd.api.types.is_string_dtype(df[c])]


def _escape(text) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class Section:
    title: str
    text: str = ""
    blocks: list[str] = field(default_factory=list)

    def figure(self, fig) -> Section:
        """Add a plotly figure (plotly.js comes once, with the page)."""
        self.blocks.append(fig.to_html(full_html=False, include_plotlyjs=False,
                                       config={"responsive": True}))
        return self

    def table(self, rows: pd.DataFrame | list[dict], floatfmt: str = "{:.3f}") -> Section:
        """Add a table; cells are escaped and keep their line breaks."""
        df = (rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)).copy()
        # Escaped here, not by pandas, which would print a text's newlines as a literal "\n".
        for col in text_columns(df):
            df[col] = df[col].map(lambda v: _escape(v).replace("\n", "<br>"))
        df.columns = [_escape(c) for c in df.columns]
        self.blocks.append("<div class='table-wrap'>" + df.to_html(
            index=False, escape=False, border=0, float_format=floatfmt.format) + "</div>")
        return self

    def finding(self, text: str) -> Section:
        """State what the section found, in one sentence computed from its numbers."""
        self.blocks.append(f"<p class='finding'><b>Finding.</b> {_escape(text)}</p>")
        return self

    def html(self, fragment: str) -> Section:
        """Add an HTML fragment built by memlens (e.g. :func:`token_view`), as is."""
        self.blocks.append(fragment)
        return self

    def render(self) -> str:
        prose = "".join(f"<p class='prose'>{_escape(p)}</p>" for p in self.text.split("\n\n")
                        if p.strip())
        return f"<section><h2>{_escape(self.title)}</h2>{prose}{''.join(self.blocks)}</section>"


@dataclass
class Report:
    title: str
    intro: str = ""
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str, text: str = "") -> Section:
        sec = Section(title, text)
        self.sections.append(sec)
        return sec

    def to_html(self) -> str:
        from plotly.offline import get_plotlyjs

        intro = "".join(f"<p class='prose'>{_escape(p)}</p>" for p in self.intro.split("\n\n")
                        if p.strip())
        return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
                f"<title>{_escape(self.title)}</title><style>{_STYLE}</style>"
                f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
                f"<h1>{_escape(self.title)}</h1>{intro}"
                + "".join(s.render() for s in self.sections) + "</body></html>")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def _probe_color(score: float | None) -> str:
    """White up to the probe's decision point (0.5), then deeper red up to 1."""
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "transparent"
    s = min(1.0, max(0.0, 2 * float(score) - 1))
    return f"rgb(255,{round(255 - 165 * s)},{round(255 - 165 * s)})"


def token_view(sequences: list[dict], view_id: str = "tokens") -> str:
    """Texts as tokens, coloured by memorization label or by probe score (a toggle).

    ``sequences``: ``[{"title": str, "tokens": [{"text", "label", "score", "hover"}]}]``;
    ``score`` (the probe's probability, or None) and ``hover`` (details) are optional.
    Token text and hover details are untrusted and escaped. The fragment carries its own
    styles, so ``IPython.display.HTML(token_view(...))`` shows it coloured.
    """
    chip = "padding:1px 6px;margin-right:6px;border-radius:2px;white-space:nowrap;"
    legend = "".join(f"<span style='{chip}background-color:{label_tint(k)}'>"
                     f"{_escape(k.replace('_', ' '))}</span>"
                     for k in LABEL_COLORS if k != "excluded")
    rows = []
    for seq in sequences:
        spans = []
        for tok in seq["tokens"]:
            text = str(tok["text"]).replace("\n", "\u23ce\n")
            label = tok.get("label", "excluded")
            score = tok.get("score")
            hover = tok.get("hover", "")
            detail = f"{tok['text']!r} | {label}" + (
                f" | probe {score:.2f}" if score is not None else "") + (
                f" | {hover}" if hover else "")
            spans.append(f"<span class='tok' style='background-color:{label_tint(label)};"
                         f"--probe:{_probe_color(score)}' title='{_escape(detail)}'>"
                         f"{_escape(text)}</span>")
        rows.append(f"<div class='seq' style='margin:0.6em 0'><span class='seq-title' "
                    f"style='display:block;font-weight:600'>{_escape(seq['title'])}</span>"
                    + "".join(spans) + "</div>")
    vid = _escape(view_id)
    toggle = (f"<label><input type='radio' name='{vid}-mode' checked onclick=\""
              f"document.getElementById('{vid}').className='memlens-tokens by-label'\"> "
              "memorization label</label> "
              f"<label><input type='radio' name='{vid}-mode' onclick=\""
              f"document.getElementById('{vid}').className='memlens-tokens by-probe'\"> "
              "probe score (white up to 0.5, red at 1)</label>")
    return (f"{_TOKEN_STYLE}<div style='margin:0.5em 0'>{toggle}<br>"
            f"<span style='line-height:2'>{legend}</span></div>"
            f"<div id='{vid}' class='memlens-tokens by-label'>{''.join(rows)}</div>")


def labeled_sequence(tokens: pd.DataFrame, tokenizer, seq_id: str, token_ids: list[int],
                     scores=None, title: str | None = None) -> dict:
    """One :func:`token_view` entry from a labels token table (``memlens label`` output).

    ``scores[t]`` (optional) is a probe's probability for token ``t``; positions without a
    label (the prefix) show as ``excluded``.
    """

    tok = tokens[tokens["id"].astype(str) == str(seq_id)].set_index("position")
    rows = []
    for pos, tid in enumerate(token_ids):
        info = tok.loc[pos] if pos in tok.index else None
        hover = f"position {pos}"
        if info is not None:
            hover += (f" | p(token) {math.exp(info['logprob']):.2f}"
                      f" | field {info['field'] or '-'}")
        score = None if scores is None or info is None else float(scores[pos])
        rows.append(dict(text=tokenizer.decode([tid]), hover=hover, score=score,
                         label=info["label"] if info is not None else "excluded"))
    return {"title": title or str(seq_id), "tokens": rows}
