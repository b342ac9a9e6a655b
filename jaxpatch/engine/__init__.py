"""Exhaustive, exact patch sweeps: planning (`plan`), compiled programs (`programs`), and
`sweep` itself (`sweep`). See docs/decisions/0009-engine-rooms.md for the cut."""

from jaxpatch.engine.sweep import sweep

__all__ = ["sweep"]
