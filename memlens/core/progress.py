"""Progress bars that read well in a terminal, a notebook and a log file.

In a terminal or notebook the bar updates live; redirected to a file it writes at most one
line every ``LOG_INTERVAL`` seconds, so a long step leaves a few lines in a log, not thousands.

Example:
    >>> for batch in progress(batches, desc="label", unit="batch"):
    ...     ...
"""

from __future__ import annotations

import sys

LOG_INTERVAL = 30.0


def progress(iterable=None, *, desc: str = "", total: int | None = None, unit: str = "it",
             disable: bool = False, initial: int = 0, leave: bool = True):
    """A ``tqdm.auto`` bar; quiet (``LOG_INTERVAL`` s between lines) when stderr is a file,
    and shown by rank 0 only under torchrun."""
    from tqdm.auto import tqdm

    from memlens.core.distributed import is_main

    disable = disable or not is_main()  # under torchrun, rank 0 speaks for all
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, initial=initial,
                leave=leave, mininterval=0.1 if interactive else LOG_INTERVAL,
                dynamic_ncols=interactive)
