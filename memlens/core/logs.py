"""Third-party start-up notices kept off the user's terminal.

torchao reports, on its first import, every GPU kernel a CPU build lacks ("Failed to load
..._C_mxfp8...so"), and torch's pytree module a deprecation for each enum torchao registers.
Neither is about the user's run, and both read like errors. Importing memlens raises those
two loggers to ERROR (cheap: nothing is imported); :func:`verbose` (the command line's
``--verbose``) lets them through again.

Example:
    >>> import memlens            # quiet from here on
    >>> memlens.core.logs.verbose()
"""

from __future__ import annotations

import logging

__all__ = ["NOISY", "quiet", "verbose"]

NOISY = ("torchao", "torch.utils._pytree")


def quiet() -> None:
    """Show only errors from the start-up loggers in :data:`NOISY`."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> None:
    """Let the loggers in :data:`NOISY` through again (their own default level)."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET)
