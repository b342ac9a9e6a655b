"""Exhaustive, exact patch sweeps: planning (`plan`), compiled programs (`programs`), and
`sweep` / `sweep_matrix` themselves (`sweep`). See docs/decisions/0009-engine-rooms.md for
the cut."""

from jaxpatch.engine.sweep import sweep, sweep_matrix

__all__ = ["sweep", "sweep_matrix"]
