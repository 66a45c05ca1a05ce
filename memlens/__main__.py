import sys

from memlens.cli import main

__all__ = []

sys.exit(main())
