"""The report page: token views escape text and carry their styles."""

import re

import pandas as pd
from plotly.colors import hex_to_rgb

from memlens.report.figures import LABEL_COLORS, label_tint, logprob_histogram
from memlens.report.page import Report, token_view


def test_token_text_is_escaped_and_renders_as_text(tmp_path, render):
    planted = "<script>document.title='pwned'</script>"
    view = token_view([{"title": "a <b>record</b>", "tokens": [
        {"text": "Name:", "label": "generic"},
        {"text": planted, "label": "memorized", "score": 0.9, "hover": "x' onmouseover='y"},
    ]}])
    assert planted not in view and "<b>record" not in view
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in view
    assert "onmouseover=&#x27;y" in view
    report = Report("escape check")
    report.section("tokens").html(view)
    dom, console = render(report.write(tmp_path / "r.html"))
    assert console == []
    assert "<title>escape check</title>" in dom and "pwned</title>" not in dom
    # Rendered as text: the browser re-serializes it escaped inside the token's span.
    assert re.search(r"<span class=\"tok\"[^>]*>&lt;script&gt;document.title=", dom)


def test_token_view_carries_its_own_styles_in_the_figures_palette():
    view = token_view([{"title": "5x", "tokens": [
        {"text": "<|bos|>", "label": "excluded"}, {"text": " Laura", "label": "memorized",
                                                   "score": 0.9},
        {"text": " lives", "label": "generic", "score": 0.2}]}])
    # Coloured without the report's stylesheet: the toggle's rules ship with the fragment and
    # label colours are inline (an HTML sanitizer that drops <style> keeps them).
    assert view.count("<style>") == 1 and ".memlens-tokens.by-probe span.tok" in view
    assert f"background-color:{label_tint('memorized')}" in view
    assert f"background-color:{label_tint('generic')}" in view
    assert "display:block" in view  # the title on its own line, not run into the text
    # Below the probe's decision point no colour; above it, red deepening with the score.
    assert "--probe:rgb(255,255,255)" in view and "--probe:rgb(255,123,123)" in view
    # One palette: the token view's tint and the figures' colour are the same label colour.
    fig = logprob_histogram(pd.DataFrame({"label": ["memorized", "generic", "generic"],
                                          "logprob": [-0.1, -2.0, -3.0]}))
    assert {t.name: t.marker.color for t in fig.data} == {
        "memorized (1)": LABEL_COLORS["memorized"], "generic (2)": LABEL_COLORS["generic"]}
    r, g, b = hex_to_rgb(LABEL_COLORS["memorized"])
    assert label_tint("memorized").startswith(f"rgba({r},{g},{b},")
