"""The memlens version (one place; the package and every artifact header read it)."""

VERSION = "0.1.0"
