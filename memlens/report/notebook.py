"""Set a Jupyter notebook up for memlens, once, in its first cell.

Figures then draw in JupyterLab and in exported or shared HTML (nbconvert, nbviewer), offline;
tables show whole texts; :func:`finding` states a section's result.

Example:
    >>> import memlens.report.notebook
    >>> memlens.report.notebook.setup()
    >>> memlens.report.notebook.finding(f"{rate:.0%} of the 100x canaries are recited verbatim.")
"""

from __future__ import annotations

__all__ = ["exact_by_count", "finding", "setup", "wrapped"]


def setup(max_rows: int = 60) -> None:
    """Register and select memlens' plotly renderer, embed plotly.js once (this cell's
    output), let pandas show whole cells (generations, token texts), and leave progress to
    memlens' bars (Hugging Face's weight-loading bar would stay in every saved cell)."""
    import pandas as pd
    from IPython.display import HTML, display
    from transformers.utils import logging as hf_logging

    from memlens.report.figures import use_notebook_renderer

    hf_logging.disable_progress_bar()
    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_rows", max_rows)
    display(HTML(use_notebook_renderer() + "<small>memlens: figures render in JupyterLab "
                 "and in exported HTML.</small>"))


def finding(text: str) -> None:
    """Show one sentence that states what a section found (compute it from its numbers)."""
    from IPython.display import Markdown, display

    # Site names hold underscores ("min_k", "hook_resid_post"): not Markdown emphasis.
    text = text.replace("\\", "\\\\").replace("_", "\\_").replace("*", "\\*")
    display(Markdown(f"**Finding.** {text}"))


def wrapped(df, columns=None):
    """A table whose text columns wrap and keep their line breaks, left-aligned (cells are
    HTML-escaped: they may hold model output)."""
    from memlens.report.page import text_columns

    columns = list(columns if columns is not None else text_columns(df))
    return (df.style.format(escape="html").hide(axis="index")
            .set_properties(subset=columns, **{"white-space": "pre-wrap", "text-align": "left"}))


def exact_by_count(rates) -> dict[str, float]:
    """Exact extraction of an :class:`~memlens.core.metrics.Extraction` keyed for a table
    (``"100x"``, ``"non-member"``)."""
    from memlens.report.figures import duplication_label

    return {duplication_label(k): v for k, v in rates.exact.items()}
