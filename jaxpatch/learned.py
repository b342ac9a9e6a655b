"""Learned patches: one trained gate per component, under a sparsity penalty.

A ranking of single-component patches cannot see components that only work together (patched
alone, each recovers little) or changes that cancel (each moves the metric, together they do
not). A learned patch optimizes all components' coefficients jointly: gate probabilities
`p = sigmoid(theta / T)` set every coefficient of their component, the model runs with
`start + alpha * (target - start)`, and Adam (optax) minimizes

    -min(effect(alpha), 1) + sparsity * sum(p)

where `effect` is the share of the behavior recovered (denoise: from the base towards the donor)
or destroyed (noise: from the donor towards the base), as in `SweepResult.effect`. So a
component stays in when it adds more than `sparsity` of the effect; going past the other
endpoint (an effect above 1) earns nothing. Gates start at probability 1/2 (`init` 0): started
near 1, a pair of changes that cancel (values times c, outputs divided by c) is kept, because
closing either gate alone breaks the model. The temperature T anneals
geometrically from `temperatures[0]` to `temperatures[1]`, pushing gates towards 0 or 1 (at the
default 0.02 the final gates are binary, so the hard patch's effect matches the last soft one;
at 0.1 a third of the gates on the example pair were still between 0.4 and 0.8); the returned
patch keeps the components whose final probability exceeds 1/2, and its effect is then measured
exactly with the plain forward.

This is the documented alternative to hard-concrete (L0) gates: deterministic, no sampling, and
the penalty reads directly in units of effect. Gradients with respect to the coefficients come
from the probe-weight forward of `jaxpatch.attribution.value_and_alpha_gradient` (no weight
gradient is formed); the chain rule to the gates is one small vector-Jacobian product. Blocks
before the first candidate run once (prefix reuse), and `remat=True` bounds memory to one
block's activations as in attribution's block-by-block mode.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpatch._tree import unflatten_dotted
from jaxpatch.attribution import value_and_alpha_gradient
from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.engine import PreparedPair
from jaxpatch.engine.prepared import PROMPT_AXES
from jaxpatch.errors import JaxpatchError
from jaxpatch.metrics import Metric
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.modes import PAIR_DIRECTIONS, Granularity, PairDirection, check_mode
from jaxpatch.pair import endpoints, score_patch
from jaxpatch.patch import Patch, alpha_shapes, component_entries, mix_leaf
from jaxpatch.prompts import Batch
from jaxpatch.rounding import jit
from jaxpatch.runs.settings import Execution, execution_of

__all__ = ["GateTraining", "LearnedPatch", "gate_index", "learn_patch"]


@dataclasses.dataclass(kw_only=True)
class LearnedPatch:
    """What `learn_patch` found.

    Attributes:
        patch: the components whose final gate probability exceeds 1/2, coefficient 1.
        names: every candidate component, in order.
        probabilities: the final gate probability of each candidate (the learned scores).
        effect: the exact effect of `patch` (plain forward): share of the behavior recovered
            (denoise) or destroyed (noise).
        curve: every `log_every` steps and the last: step, temperature, soft effect, expected
            size (sum of probabilities) and loss.
        direction, granularity, sparsity: how it was learned.
    """

    patch: Patch
    names: list[str]
    probabilities: np.ndarray
    effect: float
    curve: list[dict[str, float]]
    direction: PairDirection
    granularity: Granularity
    sparsity: float

    @property
    def selected(self) -> list[str]:
        """The names of the components in `patch`."""
        return [n for n, p in zip(self.names, self.probabilities) if p > 0.5]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (the patch itself as `jaxpatch.patch/1` text).

        Example:
            >>> learned = learn_patch(pair, jaxpatch.VectorAnchor(layer=1), granularity="layer",
            ...                       training=GateTraining(steps=5))
            >>> sorted(learned.to_dict())[:4]
            ['curve', 'direction', 'effect', 'granularity']
        """
        return {"direction": self.direction, "granularity": self.granularity,
                "sparsity": self.sparsity, "effect": self.effect, "size": len(self.selected),
                "selected": self.selected, "names": list(self.names),
                "probabilities": dict(zip(self.names, (float(p) for p in self.probabilities))),
                "curve": self.curve, "patch": json.loads(self.patch.to_json())}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnedPatch:
        """Rebuilds a learned patch from `to_dict` output (exactly: floats round-trip).

        Example:
            >>> learned = learn_patch(pair, jaxpatch.VectorAnchor(layer=1), granularity="layer",
            ...                       training=GateTraining(steps=5))
            >>> again = LearnedPatch.from_dict(learned.to_dict())
            >>> again.to_dict() == learned.to_dict()
            True
        """
        names = list(data["names"])  # in candidate order (a JSON object's keys may be sorted)
        return cls(patch=Patch.from_json(json.dumps(data["patch"]), "learned patch"), names=names,
                   probabilities=np.array([data["probabilities"][n] for n in names], np.float64),
                   effect=float(data["effect"]), curve=list(data["curve"]),
                   direction=data["direction"], granularity=data["granularity"],
                   sparsity=float(data["sparsity"]))


def gate_index(config: ModelConfig, items: Sequence[Component]) -> Params:
    """For every coefficient, the position in `items` of the component that owns it (-1: none).

    Components of one granularity own disjoint coefficients; a coefficient named by two items
    is refused.

    Arguments:
        config: the architecture.
        items: the candidate components.

    Returns:
        An int32 tree shaped like the coefficients (`jaxpatch.patch.alpha_shapes`).

    Raises:
        JaxpatchError: two items share a coefficient.

    Example:
        >>> from jaxpatch.components import components
        >>> heads = components(cfg, "head")[:2]
        >>> index = gate_index(cfg, heads)
        >>> index["layers"][0]["self_attn"]["q_proj"]["weight"].ravel().tolist()
        [0, 1, -1, -1]
    """
    flat = {name: np.full(shape, -1, np.int32) for name, shape in alpha_shapes(config).items()}
    for i, component in enumerate(items):
        for name, index in component_entries(config, component).items():
            if (flat[name][index] >= 0).any():
                other = items[int(flat[name][index].max())].name
                raise JaxpatchError(f"{component.name} and {other} share coefficients of {name}: "
                                    "a learned patch needs disjoint components")
            flat[name][index] = i
    return unflatten_dotted(flat)


@jit
def _alpha_of(gates: jax.Array, index: Params) -> Params:
    return jax.tree_util.tree_map(lambda i: jnp.where(i >= 0, gates[jnp.maximum(i, 0)], 0.0), index)


@jit
def _mix(alpha: Params, start: Params, target: Params) -> Params:
    return jax.tree_util.tree_map(mix_leaf, alpha, start, target)


@functools.lru_cache(maxsize=32)
def _adam(learning_rate: float) -> Any:
    """One Adam per learning rate, so that repeated calls reuse the compiled steps."""
    return optax.adam(learning_rate)


@functools.lru_cache(maxsize=32)
def _steps_function(config: ModelConfig, metric: Metric, optimizer: Any, start_layer: int,
                    remat: bool) -> Any:
    """Jitted: optimizer steps on the gate logits, one per entry of `temperatures`, in one
    `lax.scan` (no Python between steps; see the module docstring for the step)."""
    score_and_grad = value_and_alpha_gradient(config, metric, start_layer, remat)

    @jit
    def run(theta: jax.Array, opt_state: Any, temperatures: jax.Array, index: Params,
            start: Params, target: Params, batch: Batch, state: Any, residual: jax.Array | None,
            scale: jax.Array, offset: jax.Array,
            sparsity: jax.Array) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
        def step(carry: tuple[jax.Array, Any], temperature: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
            theta, opt_state = carry
            gates, gates_vjp = jax.vjp(lambda t: jax.nn.sigmoid(t / temperature), theta)
            alpha, alpha_vjp = jax.vjp(lambda g: _alpha_of(g, index), gates)
            score, alpha_grad = score_and_grad(_mix(alpha, start, target), start, target, batch,
                                               state, residual)
            effect = (score - offset) * scale  # recovered (denoise) or destroyed (noise) share
            # d(-min(effect, 1))/d gates through the coefficients, plus d(sparsity * sum)/d gates
            short = jnp.where(effect < 1.0, -scale, 0.0)
            (gate_grad,) = alpha_vjp(jax.tree_util.tree_map(lambda g: short * g, alpha_grad))
            (theta_grad,) = gates_vjp(gate_grad + sparsity)
            updates, opt_state = optimizer.update(theta_grad, opt_state, theta)
            theta = jnp.asarray(optax.apply_updates(theta, updates))
            size = jnp.sum(gates)
            loss = -jnp.minimum(effect, 1.0) + sparsity * size
            return (theta, opt_state), {"effect": effect, "size": size, "loss": loss}

        (theta, opt_state), logs = jax.lax.scan(step, (theta, opt_state), temperatures)
        return theta, opt_state, logs

    return run


@dataclasses.dataclass(frozen=True)
class GateTraining:
    """How the gates of a learned patch are trained.

    Attributes:
        steps: optimizer steps (one forward and one backward each).
        learning_rate: Adam's learning rate (ignored when `optimizer` is given).
        optimizer: any `optax.GradientTransformation` for the gate logits (the compiled steps
            are cached per optimizer object: reuse one across calls).
        init: the gates' starting logit (0: probability 1/2).
        temperatures: the gate temperature at the first and the last step (geometric schedule).
        log_every: how often the curve records a point.

    Example:
        >>> GateTraining(steps=50).temperatures
        (1.0, 0.02)
    """

    steps: int = 200
    learning_rate: float = 0.1
    optimizer: Any = None
    init: float = 0.0
    temperatures: tuple[float, float] = (1.0, 0.02)
    log_every: int = 10


def learn_patch(pair: PreparedPair, metric: Metric, *, granularity: Granularity = "module",
                selector: SelectorLike | None = None, direction: PairDirection = "denoise",
                sparsity: float = 0.01, training: GateTraining | None = None,
                execution: Execution | None = None) -> LearnedPatch:
    """Learns the smallest set of components whose weights, moved together, recover (denoise)
    or destroy (noise) the behavior.

    Arguments:
        pair: the base/donor pair and prompts (`jaxpatch.prepare`); on a mesh, params split
            along `model`, prompts along `candidates` and `data` together, as for `attribute`.
        metric: the behavioral interface.
        granularity: module, head, neuron or layer.
        selector: restrict the candidates to a selector (default: every component).
        direction: "denoise" (gates move base weights to the donor's) or "noise" (donor weights
            to the base's).
        sparsity: the penalty per unit of gate probability, in units of effect: a component
            stays when it adds more than this share of the behavior.
        training: steps, optimizer and temperature schedule (`GateTraining`).
        execution: `remat` recomputes each block's activations in the backward pass (memory
            of one block's activations, one more forward of compute per step); with a log, the
            finished patch is recorded there and read back instead of learned again.

    Returns:
        A `LearnedPatch`.

    Raises:
        JaxpatchError: a bad direction, steps or temperature, or overlapping candidates.

    Example:
        >>> learned = learn_patch(pair, jaxpatch.VectorAnchor(layer=1), sparsity=0.01,
        ...                       training=GateTraining(steps=100))
        >>> learned.effect > 0.8, len(learned.selected) < len(learned.names)
        (True, True)
    """
    pair.require_patches_everywhere("the learned patch")
    training = GateTraining() if training is None else training
    execution = execution_of(execution)
    if execution.log is not None:  # the finished patch, recorded whole
        return execution.recorded("learned", LearnedPatch, lambda settings: learn_patch(
            pair, metric, granularity=granularity, selector=selector, direction=direction,
            sparsity=sparsity, training=training, execution=settings))
    remat = execution.remat
    steps, log_every, temperatures = training.steps, training.log_every, training.temperatures
    check_mode("learned-patch direction", direction, PAIR_DIRECTIONS, JaxpatchError)
    if steps < 1 or log_every < 1:
        raise JaxpatchError(f"steps and log_every must be at least 1, got {steps} and {log_every}")
    if min(temperatures) <= 0:
        raise JaxpatchError(f"gate temperatures must be positive, got {temperatures}")
    config, batch = pair.config, pair.batch_along(PROMPT_AXES)
    items = select(config, selector, granularity)
    index = gate_index(config, items)
    start, target = endpoints(pair.base, pair.donor, direction)
    state, base_score, donor_score, _ = pair.endpoints(metric)
    # effect = (score - offset) * scale: 0 at the start, 1 at the target
    offset = base_score if direction == "denoise" else donor_score
    scale = 1.0 / (donor_score - base_score) * (1.0 if direction == "denoise" else -1.0)
    optimizer = training.optimizer if training.optimizer is not None else _adam(training.learning_rate)
    # Prefix reuse: blocks before the first candidate's never change, so their output is
    # computed once and every step starts after them (a metric reading component outputs
    # may read those blocks: it runs from the embeddings).
    first = 0 if metric.outputs(config) else min(c.layer for c in items)
    residual = None
    if first > 0:
        residual = forward(config, start, batch.tokens, batch.mask, stop_layer=first - 1).residual
    run = _steps_function(config, metric, optimizer, max(first, 0), remat)
    theta = jnp.full(len(items), training.init, jnp.float32)
    opt_state = optimizer.init(theta)
    t0, t1 = temperatures
    schedule = t0 * (t1 / t0) ** (np.arange(steps) / max(steps - 1, 1))
    curve: list[dict[str, float]] = []
    for lo in range(0, steps, log_every):  # one compiled scan per chunk (the last may be shorter)
        chunk = schedule[lo:lo + log_every]
        theta, opt_state, logs = run(theta, opt_state, jnp.asarray(chunk, jnp.float32), index, start,
                                     target, batch, state, residual, jnp.float32(scale),
                                     jnp.float32(offset), jnp.float32(sparsity))
        logs = {k: np.asarray(v) for k, v in logs.items()}
        for j in sorted({0, len(chunk) - 1} if lo + len(chunk) == steps else {0}):
            point = {"step": lo + j, "temperature": float(chunk[j]),
                     **{k: float(v[j]) for k, v in logs.items()}}
            curve.append(dict(sorted(point.items())))  # one key order, also when read back
    temperature = float(schedule[-1])
    probabilities = np.asarray(jax.nn.sigmoid(theta / temperature), np.float64)
    chosen = [c for c, p in zip(items, probabilities) if p > 0.5]
    patch = Patch.from_components(config, chosen)
    score = score_patch(pair.base, pair.donor, patch, batch, metric, direction, state)
    effect = (score - offset) * scale
    return LearnedPatch(patch=patch, names=[c.name for c in items], probabilities=probabilities,
                        effect=float(effect), curve=curve, direction=direction,
                        granularity=granularity, sparsity=sparsity)

