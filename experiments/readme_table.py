"""Write the README's demo table from a demo's summary.json.

    memlens demo && python experiments/readme_table.py memlens-demo/summary.json

The table stands between the README's ``<!-- demo table -->`` and ``<!-- end demo table -->``
lines; rerun this whenever the demo's numbers change. ``--check`` only says whether the
README holds the table the summary gives (exit 1 when not).
"""

import argparse
import json
import re
import sys
from pathlib import Path

from memlens.steps.run import headline_rows, markdown_table

README = Path(__file__).parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- demo table[^\n]*-->)\n(.*?)\n?(<!-- end demo table -->)", re.S)


def readme_table(readme: Path = README) -> str:
    """The demo table the README holds now."""
    match = BLOCK.search(readme.read_text())
    if match is None:
        raise SystemExit(f"{readme} has no '<!-- demo table -->' ... "
                         "'<!-- end demo table -->' block")
    return match.group(2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", type=Path, nargs="?", default=Path("memlens-demo/summary.json"))
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="compare only; write nothing")
    args = ap.parse_args()
    table = markdown_table(headline_rows(json.loads(args.summary.read_text())))
    if args.check:
        same = readme_table(args.readme) == table
        print("the README's demo table matches" if same else "the README's demo table differs")
        return 0 if same else 1
    readme_table(args.readme)  # the block is there
    text = BLOCK.sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(3)}", args.readme.read_text())
    args.readme.write_text(text)
    print(table)
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
