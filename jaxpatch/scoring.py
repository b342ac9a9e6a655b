"""Scoring localization methods against a known answer: planted sets and ROC AUC.

A *planted set* S is written as a selector whose terms may mix granularities, for example
`layers.1.mlp.down_proj | layers.2.self_attn[head=1] | layers.3.mlp[neuron=0-63]`: each term
contributes the parameters of the components it names at whichever granularity it matches.
`plant_patch` turns it into a `Patch` (alpha 1 on S), `planted_labels` says which components of a
granularity touch S, and `roc_auc` scores a method's ranking of those components.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jaxpatch.components import Component, SelectorError, SelectorLike, select
from jaxpatch.models.config import ModelConfig, Params, flatten_params
from jaxpatch.patch import Patch, component_entries

PLANT_GRANULARITIES: tuple[str, ...] = ("module", "head", "neuron")


def plant_patch(config: ModelConfig, selector: SelectorLike) -> Patch:
    """The patch with coefficient 1 on every parameter a planted-set selector names.

    Each term is matched at the module, head and neuron granularities; what it matches at any of
    them belongs to the set (so `layers.2.mlp` and `layers.2.mlp[neuron=0-255]` name the same
    parameters).

    Arguments:
        config: the architecture.
        selector: the planted set.

    Returns:
        The patch, labelled with the selector.

    Raises:
        SelectorError: the selector does not parse, or matches nothing at any granularity.

    Example:
        >>> cfg = ModelConfig.tiny("llama")
        >>> # down_proj's 64 per-neuron coefficients, then head 1's q and o coefficients
        >>> plant_patch(cfg, "layers.0.mlp.down_proj | layers.1.self_attn[head=1]").num_nonzero()
        66
    """
    chosen: list[Component] = []
    for granularity in PLANT_GRANULARITIES:
        try:
            chosen += select(config, selector, granularity)
        except SelectorError as e:
            if "matches no component" not in str(e):
                raise
    if not chosen:
        raise SelectorError(f"planted set {str(selector)!r} matches no module, head or neuron")
    label = " | ".join(selector) if isinstance(selector, list) else str(selector)
    return Patch.from_components(config, chosen, label=label)


def plant_mask(config: ModelConfig, plant: Patch) -> Params:
    """The planted set as a 0/1 mask shaped like the params (for training only S).

    Example:
        >>> cfg = ModelConfig.tiny("llama")
        >>> m = plant_mask(cfg, plant_patch(cfg, "layers.1.self_attn[head=1]"))
        >>> float(m["layers"][1]["self_attn"]["q_proj"]["weight"].sum()) == cfg.d_model * cfg.head_dim
        True
    """
    from jaxpatch.models.config import param_shapes

    return jax.tree_util.tree_map(lambda a, s: np.broadcast_to(np.asarray(a, np.float32), s.shape).copy(),
                                  plant.alpha, param_shapes(config))


def planted_labels(config: ModelConfig, plant: Patch, items: Sequence[Component]) -> np.ndarray:
    """For each component, whether any of its coefficients lies in the planted set.

    Arguments:
        config: the architecture.
        plant: the planted set (`plant_patch`).
        items: the components to label.

    Returns:
        A boolean array, one entry per component.

    Example:
        >>> from jaxpatch.components import components
        >>> cfg = ModelConfig.tiny("llama")
        >>> plant = plant_patch(cfg, "layers.1.self_attn[head=1]")
        >>> [c.name for c, y in zip(components(cfg, "module"), planted_labels(
        ...     cfg, plant, components(cfg, "module"))) if y]
        ['layers.1.self_attn.q_proj', 'layers.1.self_attn.o_proj']
    """
    flat = {name: np.asarray(a) for name, a in flatten_params(plant.alpha).items()}
    return np.array([any(np.any(flat[name][index] != 0)
                         for name, index in component_entries(config, c).items())
                     for c in items], bool)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The area under the ROC curve of ranking by `scores` (higher = more likely in the set):
    the probability that a random positive outranks a random negative, ties counting one half.

    Arguments:
        scores: one score per component.
        labels: True for components in the planted set.

    Returns:
        The AUC in [0, 1] (0.5 for a random ranking); NaN when either class is empty.

    Example:
        >>> roc_auc([0.9, 0.1, 0.5, 0.5], [True, False, True, False])
        0.875
    """
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold, from (0, 0) to (1, 1); tied scores
    move along one diagonal step.

    Example:
        >>> fpr, tpr = roc_curve([0.9, 0.1], [True, False])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    """
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr
