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

# Token colours by memorization label (labels.py's names).
LABEL_COLORS = {"memorized": "#f4a3a3", "partial": "#f8d49a", "not_memorized": "#cfe3f7",
                "generic": "#ececec", "excluded": "#ffffff"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1450px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
section { margin-bottom: 2.5em; } .prose { max-width: 60em; line-height: 1.45; }
table.dataframe { border-collapse: collapse; font-size: 0.9em; margin: 0.8em 0; }
table.dataframe td, table.dataframe th { border: 1px solid #ddd; padding: 3px 8px; }
.tokens { font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 1.9; }
.tokens .seq { margin: 0.6em 0; } .tokens .seq-title { font-weight: 600; margin-right: 0.5em; }
.tokens span.tok { white-space: pre-wrap; border-radius: 2px; padding: 1px 0; }
.tokens.by-label span.tok { background: var(--label); }
.tokens.by-probe span.tok { background: var(--probe); }
.legend span { padding: 1px 6px; margin-right: 6px; border-radius: 2px; }
"""


def _escape(text) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class Section:
    title: str
    text: str = ""
    blocks: list[str] = field(default_factory=list)

    def figure(self, fig) -> Section:
        """Add a plotly figure (plotly.js comes once, with the page)."""
        self.blocks.append(fig.to_html(full_html=False, include_plotlyjs=False))
        return self

    def table(self, rows: pd.DataFrame | list[dict], floatfmt: str = "{:.3f}") -> Section:
        """Add a table; cells are escaped."""
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
        self.blocks.append(df.to_html(index=False, escape=True, border=0,
                                      float_format=floatfmt.format))
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
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "#ffffff"
    s = min(1.0, max(0.0, float(score)))  # white -> red with the probe's probability
    return f"rgb(255,{round(255 - 155 * s)},{round(255 - 155 * s)})"


def token_view(sequences: list[dict], view_id: str = "tokens") -> str:
    """Texts as tokens, coloured by memorization label or by probe score (a toggle).

    ``sequences``: ``[{"title": str, "tokens": [{"text", "label", "score", "hover"}]}]``;
    ``score`` (the probe's probability, or None) and ``hover`` (details) are optional.
    Token text and hover details are untrusted and escaped.
    """
    legend = "".join(f"<span style='background:{c}'>{_escape(k)}</span>"
                     for k, c in LABEL_COLORS.items() if k != "excluded")
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
            spans.append(f"<span class='tok' style='--label:{LABEL_COLORS.get(label, '#fff')};"
                         f"--probe:{_probe_color(score)}' title='{_escape(detail)}'>"
                         f"{_escape(text)}</span>")
        rows.append(f"<div class='seq'><span class='seq-title'>{_escape(seq['title'])}</span>"
                    + "".join(spans) + "</div>")
    toggle = (f"<label><input type='radio' name='{view_id}-mode' checked onclick=\""
              f"document.getElementById('{view_id}').className='tokens by-label'\"> "
              "memorization label</label> "
              f"<label><input type='radio' name='{view_id}-mode' onclick=\""
              f"document.getElementById('{view_id}').className='tokens by-probe'\"> "
              "probe score (white 0 to red 1)</label>")
    return (f"<div class='legend'>{toggle}<br>{legend}</div>"
            f"<div id='{_escape(view_id)}' class='tokens by-label'>{''.join(rows)}</div>")


def labeled_sequence(tokens: pd.DataFrame, tokenizer, seq_id: str, token_ids: list[int],
                     scores=None, title: str | None = None) -> dict:
    """One :func:`token_view` entry from a labels token table (``memlens label`` output).

    ``scores[t]`` (optional) is a probe's probability for token ``t``; positions without a
    label (the prefix) show as ``excluded``.
    """
    import math

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
