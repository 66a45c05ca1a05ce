"""The artifact chain, one module per step."""

__all__ = []
