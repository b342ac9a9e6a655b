"""Planted sets: the known answer a localization method is scored against.

A *planted set* S is written as a selector whose terms may mix granularities, for example
`layers.1.mlp.down_proj | layers.2.self_attn[head=1] | layers.3.mlp[neuron=0-63]`: each term
contributes the parameters of the components it names at whichever granularity it matches.
`plant_patch` turns it into a `Patch` (alpha 1 on S), `planted_labels` says which components of a
granularity touch S, and `jaxpatch.stats.roc_auc` scores a method's ranking of those components.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jaxpatch._tree import flatten_params
from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.errors import SelectorError
from jaxpatch.models.config import ModelConfig, Params, param_shapes
from jaxpatch.modes import SCORED_GRANULARITIES
from jaxpatch.patch import Patch, component_entries

__all__ = ["plant_patch", "plant_mask", "planted_labels"]


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
        >>> plant_patch(cfg, "layers.0.mlp.down_proj | layers.1.self_attn[head=1]").num_nonzero()
        66

        (down_proj's 64 per-neuron coefficients, then head 1's q and o coefficients.)
    """
    chosen: list[Component] = []
    for granularity in SCORED_GRANULARITIES:
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
