"""The memlens version (one place; the package and every artifact header read it)."""

__all__ = ["VERSION"]

VERSION = "0.2.0"
