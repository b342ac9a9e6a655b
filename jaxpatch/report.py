"""Figures and tables of results."""

from __future__ import annotations

import io
import re

import numpy as np

from jaxpatch.engine import SweepResult

_INDEXED = re.compile(r"layers\.(\d+)\.(.+?)\[(\w+)=(\d+)\]$")
_MODULE = re.compile(r"layers\.(\d+)\.(.+)$")


def heatmap_grid(result: SweepResult) -> tuple[np.ndarray, list[str], list[str]]:
    """Arranges a result's effects as layers x columns (modules, heads or neurons).

    Components outside blocks (embeddings, final norm, lm_head) are left out; cells without a
    component are NaN.

    Returns:
        `(grid [layers, columns], row labels, column labels)`.

    Example:
        >>> r = SweepResult("m", "denoise", None, "last", 0.0, 1.0,
        ...                 ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"], np.array([0.1, 0.2]))
        >>> heatmap_grid(r)[0].tolist()
        [[0.1], [0.2]]
    """
    cells: dict[tuple[int, str], float] = {}
    columns: list[str] = []
    for name, value in zip(result.names, result.effect):
        m = _INDEXED.match(name)
        if m:
            layer, column = int(m.group(1)), f"{'kv' if m.group(3) == 'kv_head' else ''}{m.group(4)}"
        elif name.startswith("layers.") and _MODULE.match(name):
            mm = _MODULE.match(name)
            layer, column = int(mm.group(1)), mm.group(2)
        elif re.fullmatch(r"layers\.\d+", name):
            layer, column = int(name.split(".")[1]), "block"
        else:
            continue
        if column not in columns:
            columns.append(column)
        cells[(layer, column)] = float(value)
    layers = sorted({layer for layer, _ in cells})
    grid = np.full((len(layers), len(columns)), np.nan)
    for (layer, column), value in cells.items():
        grid[layers.index(layer), columns.index(column)] = value
    return grid, [f"layer {i}" for i in layers], columns


def heatmap_png(result: SweepResult, title: str | None = None) -> bytes:
    """A heatmap of effects (layers x modules, heads or neurons) as PNG bytes.

    Example:
        >>> r = SweepResult("m", "denoise", None, "last", 0.0, 1.0, ["layers.0.mlp.up_proj"], np.array([0.5]))
        >>> heatmap_png(r)[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, rows, columns = heatmap_grid(result)
    many = len(columns) > 40
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.6 * len(columns)) if not many else 12,
                                    1.5 + 0.4 * len(rows)))
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    if not many:
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    else:
        ax.set_xlabel(f"{len(columns)} components per layer")
    fig.colorbar(image, ax=ax, label="effect (recovery units)")
    ax.set_title(title or f"{result.direction} sweep, {result.metric}"
                 + (f" at layer {result.anchor_layer}" if result.anchor_layer is not None else ""))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def summary_table(result: SweepResult, k: int = 10) -> str:
    """The top-k components by effect as a plain-text table.

    Example:
        >>> r = SweepResult("m", "denoise", None, "last", 0.0, 1.0, ["a"], np.array([0.5]))
        >>> "a" in summary_table(r)
        True
    """
    lines = [f"{result.metric} ({result.direction}): base {result.base_score:.6g}, "
             f"donor {result.donor_score:.6g}", f"{'component':<40} {'effect':>10}"]
    lines += [f"{name:<40} {effect:>10.4f}" for name, effect in result.top(k)]
    return "\n".join(lines)
