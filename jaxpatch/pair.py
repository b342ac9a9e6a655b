"""A base/donor pair: checked to be one architecture, its endpoints per direction, the metric
fitted to it, one patch scored the plain way, and how far each component moved (|dW|).

Every scoring method (sweeps, attribution, activation patching) starts here: `check_pair`
refuses a pair that cannot be patched, `endpoints` says which params a patch moves from and
to, and `endpoint_scores` fits the metric and scores recovery's 0 and 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpatch._tree import flatten_params
from jaxpatch.components import Component
from jaxpatch.errors import JaxpatchError, MetricError, NonFiniteError
from jaxpatch.mesh import place_params, place_prompts
from jaxpatch.metrics import Metric, Readout, mean_score, metric_endpoints, metric_readout
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.model import Model
from jaxpatch.modes import DIRECTIONS, Direction, check_mode
from jaxpatch.patch import Patch, ablation_target, apply, check_compatible, component_entries
from jaxpatch.prompts import Batch

__all__ = ["check_pair", "endpoints", "endpoint_scores", "score_patch", "placed_on", "delta_norms",
           "weight_norms"]


def check_pair(base: Model, donor: Model) -> None:
    """Refuses a base/donor pair that is not the same architecture.

    Arguments:
        base, donor: the pair.

    Raises:
        PatchError: naming the first tensor that differs, with both shapes.
        JaxpatchError: naming the first config setting that differs.

    Example:
        >>> check_pair(base, donor)  # same architecture: nothing to say
        >>> other = jaxpatch.Model(jaxpatch.ModelConfig.tiny("llama", d_ff=32), donor.params)
        >>> try:
        ...     check_pair(base, other)
        ... except jaxpatch.JaxpatchError as e:
        ...     print(e)
        base and donor differ in d_ff (64 vs 32): weight patching needs one architecture
    """
    check_compatible(base.params, donor.params)
    for field in dataclasses.fields(ModelConfig):
        if field.name in ("metadata", "dtype"):
            continue
        a, b = getattr(base.config, field.name), getattr(donor.config, field.name)
        if a != b:
            raise JaxpatchError(f"base and donor differ in {field.name} ({a!r} vs {b!r}): "
                                "weight patching needs one architecture")


def endpoints(base: Model, donor: Model, direction: Direction,
              references: Sequence[Params] | None = None) -> tuple[Params, Params]:
    """The params a patch starts from and moves towards, in a direction.

    Arguments:
        base, donor: the pair.
        direction: "denoise" (from the base towards the donor), "noise" (from the donor
            towards the base), "zero" or "mean" (from the donor towards zeros, or towards the
            mean of `references`).
        references: params of reference models, for "mean".

    Returns:
        `(start, target)`: the base's or the donor's own params trees (the very objects), or
        for an ablation a new target; a target whose dtypes differ from the start's is cast
        to them.

    Example:
        >>> start, target = endpoints(base, donor, "noise")
        >>> start is donor.params
        True
    """
    check_mode("direction", direction, DIRECTIONS, JaxpatchError)
    if direction == "denoise":
        start, target = base.params, donor.params
    elif direction == "noise":
        start, target = donor.params, base.params
    else:
        start = donor.params
        target = ablation_target(donor.params, direction, references)
    leaves = zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(start))
    if any(t.dtype != s.dtype for t, s in leaves):
        target = jax.tree_util.tree_map(lambda t, s: t.astype(s.dtype), target, start)
    return start, target


def endpoint_scores(config: ModelConfig, base: Model, donor: Model, batch: Batch, metric: Metric,
                    readouts: tuple[Readout, Readout] | None = None) -> tuple[Any, Any, Any]:
    """Prepares a metric and scores the base and donor (recovery 0 and 1).

    Arguments:
        config, base, donor, batch, metric: the run.
        readouts: the base's and donor's readouts (`metrics.metric_endpoints`) when the
            caller has them already; computed otherwise.

    Returns:
        `(state, base_score, donor_score)`: floats, or `[width]` arrays for a metric with
        several columns (`Metric.width`).

    Raises:
        NonFiniteError: a score is NaN or infinite.
        MetricError: base and donor score the same, so recovery is undefined.

    Example:
        >>> state, base_score, donor_score = endpoint_scores(cfg, base, donor, batch,
        ...                                                  jaxpatch.VectorAnchor(layer=1))
        >>> donor_score > base_score  # the anchor points from the base towards the donor
        True
    """
    readouts = readouts or metric_endpoints(config, metric, base.params, donor.params, batch)
    state = metric.prepare(config, base.params, donor.params, batch, readouts)
    base_score, donor_score = (np.asarray(mean_score(metric, x, batch, state), np.float64)
                               for x in readouts)
    for column, b, d in zip(metric.columns(), base_score.reshape(-1), donor_score.reshape(-1)):
        what = metric.name if base_score.ndim == 0 else f"{metric.name} score of {column}"
        if not math.isfinite(b) or not math.isfinite(d):
            raise NonFiniteError(f"the {what} is not finite (base {b}, donor {d})")
        if b == d:
            raise MetricError(f"base and donor have the same {what} ({b}): recovery is "
                              "undefined on these prompts")
    if base_score.ndim == 0:
        return state, float(base_score), float(donor_score)
    return state, base_score, donor_score


def score_patch(base: Model, donor: Model, patch: Patch, batch: Batch, metric: Metric,
                direction: Direction = "denoise", state: Any = None) -> float:
    """The metric score of one patch, by patching the params and running the plain forward.

    This is the reference `sweep` is tested against; use `sweep` for many candidates.

    Arguments:
        base, donor: the pair.
        patch: the coefficients.
        batch, metric: the run.
        direction: which way the patch moves weights (see `endpoints`).
        state: the metric's prepared state (default: prepared here).

    Returns:
        The mean metric score of the patched model.

    Example:
        >>> metric = jaxpatch.VectorAnchor(layer=1)
        >>> state, base_score, donor_score = endpoint_scores(cfg, base, donor, batch, metric)
        >>> everything = jaxpatch.Patch.from_selector(cfg, "layers.0-1 | embed_tokens")
        >>> abs(score_patch(base, donor, everything, batch, metric, state=state) - donor_score) < 1e-5
        True
    """
    start, target = endpoints(base, donor, direction)
    if state is None:
        state = metric.prepare(base.config, base.params, donor.params, batch)
    patched = apply(patch, start, target)
    return float(mean_score(metric, metric_readout(base.config, metric, patched, batch), batch, state))


def placed_on(mesh: Mesh | None, base: Model, donor: Model, batch: Batch,
              prompt_axes: tuple[str, ...] = ("data",)) -> tuple[Model, Model, Batch]:
    """The pair and prompts placed on a mesh before any program runs: params split along
    `model` (no copy when loaded so), prompts along `prompt_axes` (see `jaxpatch.mesh`).
    Without a mesh, the same objects.

    Example:
        >>> from jaxpatch.mesh import make_mesh
        >>> b, d, p = placed_on(make_mesh({"model": 1}), base, donor, batch)
        >>> b.params["layers"][0]["mlp"]["up_proj"]["weight"].sharding.spec
        P(None, 'model')
    """
    if mesh is None:
        return base, donor, batch
    base, donor = (dataclasses.replace(m, params=place_params(mesh, m.params))
                   for m in (base, donor))
    return base, donor, place_prompts(mesh, batch, batch.tokens.shape[0], prompt_axes)


def delta_norms(config: ModelConfig, base: Params, donor: Params,
                items: Sequence[Component]) -> np.ndarray:
    """How far each component moved between base and donor: the Frobenius norm of
    `donor - base` over its parameters (|dW|, the baseline every localization is compared with).

    Arguments:
        config: the architecture.
        base, donor: the two params trees.
        items: the components (`jaxpatch.select`).

    Returns:
        float64 `[len(items)]`.

    Example:
        >>> from jaxpatch.components import components
        >>> float(delta_norms(cfg, base.params, base.params, components(cfg, "head")).max())
        0.0
        >>> delta_norms(cfg, base.params, donor.params, components(cfg, "module")[:1]) > 0
        array([ True])
    """
    flat_base, flat_donor = _host_leaves(base), _host_leaves(donor)
    return _component_norms(config, items, lambda name, index: (
        flat_donor[name][index].astype(np.float64) - flat_base[name][index].astype(np.float64)))


def weight_norms(config: ModelConfig, params: Params, items: Sequence[Component]) -> np.ndarray:
    """The Frobenius norm of each component's parameters, |W| (what |dW| is relative to).

    Arguments:
        config: the architecture.
        params: the params tree.
        items: the components (`jaxpatch.select`).

    Returns:
        float64 `[len(items)]`.

    Example:
        >>> from jaxpatch.components import components
        >>> first = components(cfg, "module")[:1]
        >>> bool(np.isclose(weight_norms(cfg, base.params, first)[0],
        ...                 np.linalg.norm(np.asarray(base.params["embed_tokens"]["weight"]))))
        True
    """
    flat = _host_leaves(params)
    return _component_norms(config, items,
                            lambda name, index: flat[name][index].astype(np.float64))


def _host_leaves(params: Params) -> dict[str, np.ndarray]:
    """The leaves as host arrays in their own dtype (no copy on a CPU)."""
    return {n: np.asarray(v) for n, v in flatten_params(params).items()}


def _component_norms(config: ModelConfig, items: Sequence[Component],
                     values: Callable[[str, Any], np.ndarray]) -> np.ndarray:
    """The norm over each component's entries of `values(leaf name, index)`, each slice cast
    to float64 alone (never a float64 copy of the whole model)."""
    out = []
    for c in items:
        total = 0.0
        for name, index in component_entries(config, c).items():
            total += float(np.square(values(name, index)).sum())
        out.append(np.sqrt(total))
    return np.array(out)
