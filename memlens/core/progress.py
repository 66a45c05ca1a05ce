"""Progress bars that read well in a terminal, a notebook and a log file.

In a terminal the bar updates live; redirected to a file it writes a whole line (not a
carriage-return redraw) at most every ``LOG_INTERVAL`` seconds, so a long step leaves a few
readable lines in a log, not thousands. In a notebook it is a widget while it runs and
becomes one line when it ends ("label: 13 batch in 2.1 s", or where it stopped), so a saved
or exported notebook keeps no half-drawn bars.

Example:
    >>> for batch in progress(batches, desc="label", unit="batch"):
    ...     ...
"""

from __future__ import annotations

import sys

__all__ = ["LOG_INTERVAL", "progress"]

LOG_INTERVAL = 30.0


def progress(iterable=None, *, desc: str = "", total: int | None = None, unit: str = "it",
             disable: bool = False, initial: int = 0, leave: bool = True):
    """A ``tqdm.auto`` bar; quiet (``LOG_INTERVAL`` s between lines) when stderr is a file,
    and shown by rank 0 only under torchrun."""
    from tqdm.auto import tqdm

    from memlens.core.distributed import is_main

    disable = disable or not is_main()  # under torchrun, rank 0 speaks for all
    if not disable and "ipykernel" in sys.modules and _has_widgets():
        return _notebook_bar()(iterable, desc=desc, total=total, unit=unit, initial=initial,
                               leave=leave, mininterval=0.1)
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, initial=initial,
                leave=leave, mininterval=0.1 if interactive else LOG_INTERVAL,
                dynamic_ncols=interactive, file=None if interactive else _Lines(sys.stderr))


class _Lines:
    """A log file for tqdm: each redraw becomes its own line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _has_widgets() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def _notebook_bar():
    from IPython.display import Pretty, display
    from tqdm.notebook import tqdm as widget_bar

    class NotebookBar(widget_bar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, display=False, **kwargs)
            self.handle = display(self.container, display_id=True)

        def close(self):
            handle, self.handle = getattr(self, "handle", None), None
            super().close()
            if handle is None:
                return
            early = self.total is not None and self.n < self.total
            count = f"{self.n} of {self.total}" if early else f"{self.n}"
            handle.update(Pretty(f"{self.desc}: {count} {self.unit} in "
                                 f"{self.format_dict['elapsed']:.1f} s"
                                 + (", stopped early" if early else "")))

    return NotebookBar
