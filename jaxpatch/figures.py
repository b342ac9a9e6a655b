"""Figures and tables of any result: heatmaps of score tables, the effect-against-size front of
learned patches, the hierarchy graph, ROC curves, and the terminal summary of a sweep."""

from __future__ import annotations

import io
import itertools
import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxpatch.results import SweepResult
from jaxpatch.stats import roc_auc, roc_curve

__all__ = ["heatmap_grid", "heatmap_png", "summary_table", "roc_png", "pareto_png",
           "faithfulness_png", "hierarchy_png"]

_INDEXED = re.compile(r"layers\.(\d+)\.(.+?)\[(\w+)=(\d+)\]$")
_MODULE = re.compile(r"layers\.(\d+)\.(.+)$")


def _png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (laid out tight; the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # a legend beside the axes
    plt.close(fig)
    return buffer.getvalue()


def heatmap_grid(result: SweepResult) -> tuple[np.ndarray, list[str], list[str]]:
    """Arranges a result's effects as layers x columns (modules, heads or neurons).

    Components outside blocks (embeddings, final norm, lm_head) are left out; cells without a
    component are NaN.

    Returns:
        `(grid [layers, columns], row labels, column labels)`.

    Example:
        >>> r = SweepResult(metric="m", direction="denoise", readout_layer=None, positions="last",
        ...                 base_score=0.0, donor_score=1.0,
        ...                 names=["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"],
        ...                 scores=np.array([0.1, 0.2]))
        >>> heatmap_grid(r)[0].tolist()
        [[0.1], [0.2]]
    """
    cells: dict[tuple[int, str], float] = {}
    columns: list[str] = []
    for name, value in zip(result.names, result.effect):
        cell = _cell_of(name)
        if cell is None:
            continue
        layer, column = cell
        if column not in columns:
            columns.append(column)
        cells[(layer, column)] = float(value)
    layers = sorted({layer for layer, _ in cells})
    grid = np.full((len(layers), len(columns)), np.nan)
    for (layer, column), value in cells.items():
        grid[layers.index(layer), columns.index(column)] = value
    return grid, [f"layer {i}" for i in layers], columns


def _cell_of(name: str) -> tuple[int, str] | None:
    """A component's (layer, column) in a heatmap; None outside the blocks."""
    m = _INDEXED.match(name)
    if m:
        return int(m.group(1)), f"{'kv' if m.group(3) == 'kv_head' else ''}{m.group(4)}"
    if name.startswith("layers.") and (mm := _MODULE.match(name)):
        return int(mm.group(1)), mm.group(2)
    if re.fullmatch(r"layers\.\d+", name):
        return int(name.split(".")[1]), "block"
    return None


def pareto_png(points: Sequence[tuple[int, float]], title: str) -> bytes:
    """Effect against patch size (one point per sparsity of a learned patch) as PNG bytes.

    Example:
        >>> pareto_png([(1, 0.4), (3, 0.9), (8, 1.0)], "learned patches")[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(points)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "o-")
    ax.set_xlabel("components in the patch")
    ax.set_ylabel("effect (share of the behavior)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(fig)


def faithfulness_png(curves: Sequence[Mapping[str, Any]], title: str,
                     band: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """Faithfulness curves (f against the share of components patched, `FaithfulnessCurve
    .to_dict()` records), each labelled with its CPR and CMD, over the range of a band of
    curves (random rankings, shaded), as PNG bytes.

    Example:
        >>> c = {"label": "x", "sizes": [0, 1, 4], "components": 4, "faithfulness": [0, .6, 1],
        ...      "cpr": 0.7, "cmd": 0.3}
        >>> faithfulness_png([c], "faithfulness", band=[c])[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    if band:
        x = np.asarray(band[0]["sizes"], np.float64) / band[0]["components"]
        values = np.array([b["faithfulness"] for b in band], np.float64)
        ax.fill_between(x, values.min(0), values.max(0), color="0.85",
                        label=f"random rankings ({len(band)}), range")
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for c in curves:
        x = np.asarray(c["sizes"], np.float64) / c["components"]
        ax.plot(x, c["faithfulness"], marker="o", ms=3,
                label=f"{c['label']} (CPR {c['cpr']:.2f}, CMD {c['cmd']:.2f})",
                **_curve_style(str(c["label"]), colors))
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
    ax.set_xlabel("share of components patched (top k / n)")
    ax.set_ylabel("faithfulness f(k)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return _png(fig)


def _curve_style(label: str, colors: Any) -> dict[str, Any]:
    """How a ranking's line is drawn: the reference (a planted set's own curve) thick black,
    |dW| and random rankings in grey (the baselines), every method in its own colour."""
    name = label.lower()
    if "reference" in name or name.startswith("s first"):
        return {"color": "black", "lw": 2.4}
    if name.startswith("random"):
        return {"color": "0.55", "lw": 1.2, "ls": ":"}
    if "|dw|" in name or "delta-norm" in name or "donor - base" in name:
        return {"color": "0.35", "lw": 1.4, "ls": "--"}
    return {"color": next(colors), "lw": 1.5}


def _legend_right(ax: Any) -> None:
    """The legend beside the axes, at reading size, where it hides no line."""
    ax.legend(fontsize=8.5, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)


_ROLE_LANES = {"source": 3, "aggregation": 2, "execution": 1, "inert": 0}
_ROLE_COLORS = {"source": "#c0392b", "aggregation": "#2874a6", "execution": "#239b56",
                "inert": "#b3b6b7"}


def hierarchy_png(graph: Mapping[str, Any], title: str = "source-level hierarchy",
                  planted: Mapping[str, bool] | None = None) -> bytes:
    """The hierarchy as PNG bytes: blocks along x, one lane per role, supplier -> target edges
    drawn with width and opacity by their weight score (dashed blue: only the supplier's output
    activation recovers the target, a signal passed through) (`Hierarchy.graph()` as input).

    Arguments:
        graph: the graph document (nodes with name, class and layer; edges with supplier,
            target and score).
        title: the figure's title.
        planted: optional component -> in the planted set, drawn as a black ring.

    Example:
        >>> g = {"nodes": [{"name": "layers.0.mlp.down_proj", "class": "source", "layer": 0},
        ...                {"name": "layers.1.self_attn.o_proj", "class": "aggregation", "layer": 1}],
        ...      "edges": [{"supplier": "layers.0.mlp.down_proj",
        ...                 "target": "layers.1.self_attn.o_proj", "score": 0.9}]}
        >>> hierarchy_png(g)[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = list(graph["nodes"])
    slots: dict[tuple[int, str], int] = {}
    where: dict[str, tuple[float, float]] = {}
    for node in nodes:
        key = (int(node["layer"]), node["class"])
        k = slots.get(key, 0)
        slots[key] = k + 1
        per_column, step = (8, 0.1) if node["class"] == "inert" else (5, 0.17)
        column, row = divmod(k, per_column)
        where[node["name"]] = (node["layer"] - 0.35 + 0.45 * column,
                               _ROLE_LANES[node["class"]] - 0.35 + step * row)
    layers = sorted({int(n["layer"]) for n in nodes}) or [0]
    fig, ax = plt.subplots(figsize=(3.0 + 2.0 * len(layers), 5.6))
    for edge in graph["edges"]:
        if edge["supplier"] in where and edge["target"] in where:
            (x0, y0), (x1, y1) = where[edge["supplier"]], where[edge["target"]]
            score = float(min(max(edge["score"], 0.0), 1.0))
            if score >= 0.1:  # computed in the supplier's weights
                style = dict(lw=0.4 + 2.6 * score, alpha=0.15 + 0.6 * score, color="#555")
            else:  # only the supplier's output carries it
                style = dict(lw=0.6, alpha=0.35, color="#2874a6", linestyle="--")
            ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", **style))
    for node in nodes:
        x, y = where[node["name"]]
        role = node["class"]
        ring = planted is not None and planted.get(node["name"], False)
        ax.scatter([x], [y], s=(18 if role == "inert" else 60) * (1.6 if ring else 1),
                   color=_ROLE_COLORS[role], zorder=3, edgecolors="black" if ring else "none",
                   linewidths=2.0)
        if role != "inert":
            label = node["name"].split(".", 2)[-1] if node["name"].startswith("layers.") \
                else node["name"]
            ax.annotate(label, (x, y), (5, -3), textcoords="offset points", fontsize=8, zorder=4)
    ax.set_yticks(list(_ROLE_LANES.values()),
                  [f"{r}\n(not labeled)" if r == "inert" else r for r in _ROLE_LANES])
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], color="#555", lw=2, label="supplier -> target: its weights carry "
                     "it (width: score)"),
              Line2D([], [], color="#2874a6", lw=1, linestyle="--",
                     label="only its output carries it (a signal passed through)")]
    if planted:
        legend.append(Line2D([], [], marker="o", color="none", markerfacecolor="white",
                             markeredgecolor="black", markeredgewidth=2, markersize=9,
                             label="in the planted set"))
    ax.legend(handles=legend, loc="upper left", fontsize=8, framealpha=0.9)
    final = {int(n["layer"]) for n in nodes if n["name"] in ("norm", "lm_head")}
    ax.set_xticks(layers, ["embed" if i < 0 else "final" if i in final else f"block {i}"
                           for i in layers])
    ax.set_ylim(-0.6, 4.6)  # room for the legend above the top lane
    ax.set_title(title)
    ax.grid(alpha=0.2)
    return _png(fig)


def heatmap_png(result: SweepResult, title: str | None = None,
                marked: Sequence[str] = (), marked_label: str = "planted set S") -> bytes:
    """A heatmap of effects (layers x modules, heads or neurons) as PNG bytes; the `marked`
    components (the planted set) outlined, and named in the title.

    Example:
        >>> r = SweepResult(metric="m", direction="denoise", readout_layer=None, positions="last",
        ...                 base_score=0.0, donor_score=1.0, names=["layers.0.mlp.up_proj"],
        ...                 scores=np.array([0.5]))
        >>> heatmap_png(r)[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, rows, columns = heatmap_grid(result)
    many = len(columns) > 40
    labels = 0.0 if many else 1.5  # room for the rotated column names below the cells
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.6 * len(columns)) if not many else 12,
                                    1.5 + labels + 0.4 * len(rows)))
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    if not many:
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    else:
        ax.set_xlabel(f"{len(columns)} components per layer")
    fig.colorbar(image, ax=ax, label="effect (recovery units)")
    from matplotlib.patches import Rectangle

    layers = [int(r.split()[1]) for r in rows]
    outlined = [c for c in map(_cell_of, marked) if c is not None and c[0] in layers
                and c[1] in columns]
    for layer, column in outlined:
        ax.add_patch(Rectangle((columns.index(column) - 0.5, layers.index(layer) - 0.5), 1, 1,
                                   fill=False, edgecolor="black", linewidth=2.2 if not many else 1))
    ax.set_title((title or f"{result.direction} sweep, {result.metric}"
                  + (f" at layer {result.readout_layer}" if result.readout_layer is not None else ""))
                 + (f"; outlined: {marked_label}" if outlined else ""))
    return _png(fig)


def summary_table(result: SweepResult, k: int = 10) -> str:
    """The k components with the largest |effect| (signed effects shown) as a plain-text table.

    Example:
        >>> r = SweepResult(metric="m", direction="denoise", readout_layer=None, positions="last",
        ...                 base_score=0.0, donor_score=1.0, names=["a"], scores=np.array([0.5]))
        >>> "a" in summary_table(r)
        True
    """
    lines = [f"{result.metric} ({result.direction}): base {result.base_score:.6g}, "
             f"donor {result.donor_score:.6g}; the {k} largest |effect| first",
             f"{'component':<40} {'effect':>10}"]
    lines += [f"{name:<40} {effect:>+10.4f}" for name, effect in result.top(k, by="size")]
    return "\n".join(lines)


def roc_png(labels: Sequence[bool], importances: Mapping[str, Sequence[float]], title: str) -> bytes:
    """ROC curves of several methods' rankings against planted labels, as PNG bytes.

    Example:
        >>> roc_png([True, False], {"a": [1.0, 0.0]}, "t")[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for method, scores in importances.items():
        fpr, tpr = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{method} (AUC {roc_auc(scores, labels):.3f})",
                **_curve_style(method, colors))
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    _legend_right(ax)
    return _png(fig)
