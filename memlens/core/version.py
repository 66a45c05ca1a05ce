"""The memlens version (one place; the package and every artifact header read it)."""

VERSION = "0.2.0"
