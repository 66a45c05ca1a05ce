"""Write the README's demo tables from a demo's summary.json, and its SmolLM2 audit table
from docs/results/pretrained.json.

    memlens demo && python experiments/readme_table.py memlens-demo/summary.json
    python experiments/readme_table.py --pretrained docs/results/pretrained.json

Each table stands between the README's ``<!-- NAME ... -->`` and ``<!-- end NAME -->``
lines (``demo table``: the headline per step; ``demo audit table``: every removal and
baseline under the audit; ``pretrained audit table``: the same on SmolLM2-135M); rerun this
whenever the numbers change. ``--check`` only says whether the README holds the tables
the files give (exit 1 when not).
"""

import argparse
import json
import re
import sys
from pathlib import Path

from memlens.steps.audit import markdown_audit_table
from memlens.steps.run import headline_rows, markdown_table

README = Path(__file__).parents[1] / "README.md"


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}[:\s][^\n]*-->|<!-- {name} -->)\n(.*?)\n?"
                      rf"(<!-- end {name} -->)", re.S)


def readme_table(readme: Path = README, name: str = "demo table") -> str:
    """The table the README holds now between its ``name`` markers."""
    match = _block(name).search(readme.read_text())
    if match is None:
        raise SystemExit(f"{readme} has no '<!-- {name} -->' ... '<!-- end {name} -->' block")
    return match.group(2)


def tables(summary: Path | None, pretrained: Path | None) -> dict[str, str]:
    """The README's tables, by block name, from a demo summary and the SmolLM2 results."""
    out = {}
    if summary is not None:
        s = json.loads(summary.read_text())
        out["demo table"] = markdown_table(headline_rows(s))
        out["demo audit table"] = markdown_audit_table(s["audit"])
    if pretrained is not None:
        out["pretrained audit table"] = json.loads(pretrained.read_text())["audit"]["table"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", type=Path, nargs="?", default=None,
                    help="a demo's summary.json (default memlens-demo/summary.json unless "
                    "--pretrained is given)")
    ap.add_argument("--pretrained", type=Path, default=None,
                    help="docs/results/pretrained.json: write the SmolLM2 audit table")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="compare only; write nothing")
    args = ap.parse_args()
    summary = args.summary or (None if args.pretrained else Path("memlens-demo/summary.json"))
    wanted = tables(summary, args.pretrained)
    if args.check:
        differ = [n for n, t in wanted.items() if readme_table(args.readme, n) != t]
        print(f"the README's {', '.join(differ)} differ(s)" if differ else
              f"the README's {', '.join(wanted)} match(es)")
        return 1 if differ else 0
    text = args.readme.read_text()
    for name, table in wanted.items():
        readme_table(args.readme, name)  # the block is there
        text = _block(name).sub(lambda m, t=table: f"{m.group(1)}\n{t}\n{m.group(3)}", text)
        args.readme.write_text(text)
        print(table)
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
