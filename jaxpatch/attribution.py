"""Gradient attribution in weight space: every component in one pass, then exact checks.

With patched params `start + alpha * (target - start)`, the first-order effect of component c
is the derivative of the metric with respect to c's coefficients at alpha = 0, i.e.
`<grad_W metric(start), target - start>` restricted to c. Because a `Patch` is a coefficient tree
(`jaxpatch.patch`), one forward and one backward give it for every module, head and neuron. Each
weight enters that pass as a `Probe` (`jaxpatch.models.decoder`), whose matmul computes the
derivatives of its coefficients in the backward pass without forming the weight gradient
(docs/decisions/0008).

Integrated gradients average that derivative along the whole patch path (all alphas = t, t in
[0, 1]); the per-component scores then sum to `metric(target) - metric(start)` up to the
quadrature error, which is reported as the completeness gap.

`localize` ranks all components by attribution, patches the top k and a random control sample
exactly, and reports how far the approximation can be trusted.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import flatten_params, without_layers
from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.engine import PreparedPair
from jaxpatch.engine.prepared import PROMPT_AXES
from jaxpatch.errors import JaxpatchError, MetricError
from jaxpatch.mesh import to_host
from jaxpatch.metrics import Metric, read_metric
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import Probe, attention_allowed, block, embed, rope_at, rope_tables, unembed
from jaxpatch.modes import (
    ATTRIBUTION_METHODS,
    PAIR_DIRECTIONS,
    AttributionMethod,
    Granularity,
    PairDirection,
    check_mode,
)
from jaxpatch.pair import endpoints
from jaxpatch.patch import Patch, component_entries, indexed_leaves, mix_leaf
from jaxpatch.prompts import Batch
from jaxpatch.results import SweepResult, check_finite_scores
from jaxpatch.rounding import jit
from jaxpatch.runs.settings import Execution, execution_of

__all__ = ["alpha_gradients", "value_and_alpha_gradient", "planned_gradient_bytes",
           "component_scores", "attribute"]


def _slice(tree: Any, start: int, stop: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


@jit
def _add(a: Params, b: Params) -> Params:
    return jax.tree_util.tree_map(jnp.add, a, b)


def _objective(config: ModelConfig, metric: Metric, start_layer: int = 0,
               remat: bool = False) -> Callable[..., jax.Array]:
    """`alpha -> metric score` of the model running with `base`, probed along `target - start`
    (the mean over the batch's prompts); alpha is zero, only its gradient is used. From
    `start_layer` on, the pass starts from `residual` (the stream before that block)."""

    def objective(alpha: Params, base: Params, start: Params, target: Params, batch: Batch,
                  state: Any, residual: jax.Array | None = None) -> jax.Array:
        x = read_metric(config, metric, _probes(alpha, base, start, target), batch,
                        start_layer=start_layer, residual=residual, remat=remat)
        return jnp.mean(metric.score(x, batch, state))

    return objective


@functools.lru_cache(maxsize=32)
def _gradient_function(config: ModelConfig, metric: Metric, first_order: bool) -> Callable[..., Any]:
    """Jitted: the gradient with respect to every alpha, summed over the path points `ts`
    (first order: at the start params themselves, `ts` unused), times `weight`.

    Every weight is a `Probe`, so each matmul computes its coefficients' derivatives in the
    backward pass without a weight gradient or a mixed copy of the params at the start point
    (docs/decisions/0008)."""
    grad = jax.grad(_objective(config, metric))

    @jit
    def run(ts: jax.Array, weight: jax.Array, start: Params, target: Params, batch: Batch,
            state: Any) -> Params:
        zero = Patch.zeros(config).alpha  # constants of the program

        def at(base: Params) -> Params:
            return _scale(weight, grad(zero, base, start, target, batch, state))

        if first_order:
            return at(start)
        if ts.shape[0] == 1:  # a vmap of one would batch every matmul for nothing
            return at(_mix_all(ts[0], start, target))
        return jax.tree_util.tree_map(lambda g: g.sum(0),
                                      jax.vmap(lambda t: at(_mix_all(t, start, target)))(ts))

    return run


@functools.lru_cache(maxsize=32)
def value_and_alpha_gradient(config: ModelConfig, metric: Metric, start_layer: int = 0,
                             remat: bool = False) -> Callable[..., Any]:
    """Jitted `(at, start, target, batch, state, residual=None) -> (score, gradient)`: the
    metric's mean score of the model running with weights `at`, and its gradient with respect to
    every coefficient of the patch direction `target - start` there (an alpha tree).

    `at` is any point of the patch path (`jaxpatch.apply(patch, start, target)` for any
    coefficients): the weights are linear in the coefficients, so the gradient at `at` along
    `target - start` is the coefficients' gradient, computed with probe weights as in
    `alpha_gradients` (no weight gradient is formed).

    Arguments:
        config: the architecture.
        metric: the behavioral interface (its `layer` says where the forward stops).
        start_layer: start at this block from `residual`, the residual stream before it
            (computed once when no coefficient before it can change: prefix reuse); the
            gradient of coefficients before it is then zero.
        remat: recompute each block's activations in the backward pass (memory of one block).

    Returns:
        The jitted function.

    Example:
        >>> metric = jaxpatch.VectorAnchor(layer=1)
        >>> state = pair.endpoints(metric).state
        >>> run = value_and_alpha_gradient(cfg, metric)
        >>> score, grads = run(base.params, base.params, donor.params, batch, state)
        >>> reference = alpha_gradients(pair, metric)
        >>> leaf = lambda t: t["layers"][1]["mlp"]["up_proj"]["weight"]
        >>> bool(jnp.allclose(leaf(grads), leaf(reference), rtol=1e-4, atol=1e-6))
        True
    """
    value_and_grad = jax.value_and_grad(_objective(config, metric, start_layer, remat))

    @jit
    def run(at: Params, start: Params, target: Params, batch: Batch, state: Any,
            residual: jax.Array | None = None) -> tuple[jax.Array, Params]:
        return value_and_grad(Patch.zeros(config).alpha, at, start, target, batch, state, residual)

    return run


@jit
def _mix_all(t: jax.Array, start: Params, target: Params) -> Params:
    return jax.tree_util.tree_map(lambda s, g: mix_leaf(t, s, g), start, target)


@jit
def _scale(weight: jax.Array, tree: Params) -> Params:
    return jax.tree_util.tree_map(lambda g: weight * g, tree)


def _probes(alpha: Any, base: Any, start: Any, target: Any) -> Any:
    return jax.tree_util.tree_map(Probe, base, start, target, alpha)


@functools.lru_cache(maxsize=32)
def _zero_alpha(config: ModelConfig) -> Params:
    """The all-zero coefficient tree (built once per architecture: it costs tens of ms)."""
    return Patch.zeros(config).alpha


@functools.lru_cache(maxsize=32)
def _blockwise_functions(config: ModelConfig, metric: Metric) -> dict[str, Callable[..., Any]]:
    """Jitted stages of a block-by-block gradient: each holds one block's activations at most
    (docs/decisions/0008)."""

    @jit
    def embed_forward(base: Params, tokens: jax.Array) -> jax.Array:
        return embed(config, base, tokens)

    @jit
    def block_forward(base: Params, x: jax.Array, allowed: jax.Array, rope: Any,
                      queries: jax.Array | None) -> jax.Array:
        return block(config, base, x, allowed, rope, queries)[0]

    @jit
    def head_backward(zero: Params, base: Params, start: Params, target: Params, x: jax.Array,
                      batch: Batch, state: Any) -> tuple[Params, jax.Array]:
        def score(alpha: Params, h: jax.Array) -> jax.Array:
            if metric.layer is None:
                h = unembed(config, _probes(alpha, base, start, target), h)
            return jnp.mean(metric.score(h, batch, state))

        return jax.grad(score, argnums=(0, 1))(zero, x)

    @jit
    def block_backward(zero: Params, base: Params, start: Params, target: Params, x: jax.Array,
                       allowed: jax.Array, rope: Any, queries: jax.Array | None,
                       dy: jax.Array) -> tuple[Params, jax.Array]:
        def run(alpha: Params, h: jax.Array) -> jax.Array:
            return block(config, _probes(alpha, base, start, target), h, allowed, rope, queries)[0]

        return jax.vjp(run, zero, x)[1](dy)

    @jit
    def embed_backward(zero: Params, base: Params, start: Params, target: Params,
                       tokens: jax.Array, dx: jax.Array) -> Params:
        return jax.vjp(lambda a: embed(config, _probes(a, base, start, target), tokens), zero)[1](dx)[0]

    return {"embed_forward": embed_forward, "block_forward": block_forward,
            "head_backward": head_backward, "block_backward": block_backward,
            "embed_backward": embed_backward}


def _blockwise_gradients(config: ModelConfig, metric: Metric, base: Params, start: Params,
                         target: Params, batch: Batch, state: Any) -> Params:
    """The alpha gradient (first order at `base`) computed block by block: a forward pass that
    keeps only each block's input, then each block's backward pass recomputing its activations.
    Memory: the residual stream before each block plus one block's activations, on any backend
    (XLA's CPU compiler does not reduce the memory of `jax.checkpoint`)."""
    run = _blockwise_functions(config, metric)
    zero = _zero_alpha(config)
    last = config.n_layers - 1 if metric.layer is None else metric.layer
    x = run["embed_forward"](without_layers(base), batch.tokens)
    rope = rope_tables(config, batch.tokens.shape[1], x.dtype)
    allowed = [attention_allowed(batch.mask, config.sliding_windows[i]) for i in range(last + 1)]
    inputs = []
    for i in range(last + 1):
        inputs.append(x)
        queries = batch.positions if i == last else None
        x = run["block_forward"](base["layers"][i], x, allowed[i], rope_at(config, rope, i), queries)
    outside = [without_layers(tree) for tree in (zero, base, start, target)]  # embeddings, head
    top, dx = run["head_backward"](*outside, x, batch, state)
    # Blocks after the anchor do not reach the metric: their coefficients have no effect.
    layers = [jax.tree_util.tree_map(jnp.zeros_like, layer) if i > last else None
              for i, layer in enumerate(zero["layers"])]
    for i in reversed(range(last + 1)):
        queries = batch.positions if i == last else None
        layers[i], dx = run["block_backward"](zero["layers"][i], base["layers"][i], start["layers"][i],
                                              target["layers"][i], inputs[i], allowed[i],
                                              rope_at(config, rope, i), queries, dx)
    embedding = run["embed_backward"](*outside, batch.tokens, dx)
    return {**_add(top, embedding), "layers": layers}


def planned_gradient_bytes(pair: PreparedPair, metric: Metric, *, remat: bool = False) -> int:
    """XLA's planned temporary memory of a first-order gradient, in bytes (params and outputs
    excluded): what `alpha_gradients` needs beyond the pair itself.

    With `remat`, the largest stage of the block-by-block gradient plus the residual stream kept
    before every block. Compiles the programs without running them.

    Arguments:
        pair, metric: as for `alpha_gradients`.
        remat: plan the block-by-block gradient.

    Returns:
        Bytes.

    Example:
        >>> planned_gradient_bytes(pair, jaxpatch.VectorAnchor(layer=1)) > 0
        True
    """
    config, batch = pair.config, pair.batch
    start, target = pair.base.params, pair.donor.params
    state = pair.endpoints(metric).state
    if not remat:
        program = _gradient_function(config, metric, True).lower(
            jnp.zeros(1), jnp.float32(1), start, target, batch, state)
        return int(program.compile().memory_analysis().temp_size_in_bytes)
    run = _blockwise_functions(config, metric)
    zero = _zero_alpha(config)
    x = jax.eval_shape(run["embed_forward"], without_layers(start), batch.tokens)
    x = jnp.zeros(x.shape, x.dtype)
    rope = rope_at(config, rope_tables(config, batch.tokens.shape[1], x.dtype), 0)
    allowed = attention_allowed(batch.mask, config.sliding_windows[0])
    last = config.n_layers - 1 if metric.layer is None else metric.layer
    readout_x = x[:, :batch.positions.shape[1]]  # the last block's output: readout positions only
    stages = [run["block_backward"].lower(zero["layers"][0], start["layers"][0], start["layers"][0],
                                          target["layers"][0], x, allowed, rope, queries, dy)
              for queries, dy in ((None, x), (batch.positions, readout_x))]
    outside = [without_layers(tree) for tree in (zero, start, start, target)]
    stages.append(run["head_backward"].lower(*outside, readout_x, batch, state))
    stages.append(run["embed_backward"].lower(*outside, batch.tokens, x))
    largest = max(stage.compile().memory_analysis().temp_size_in_bytes for stage in stages)
    return int(largest + (last + 1) * x.nbytes)


def alpha_gradients(pair: PreparedPair, metric: Metric, *, direction: PairDirection = "denoise",
                    method: AttributionMethod = "first-order", steps: int = 16,
                    execution: Execution | None = None) -> Params:
    """The metric's gradient with respect to every patch coefficient (an alpha tree).

    Arguments:
        pair: the base/donor pair and prompts (`jaxpatch.prepare`).
        metric: the behavioral interface.
        direction: "denoise" (at the base, towards the donor) or "noise" (at the donor, towards
            the base).
        method: "first-order" (the gradient at alpha = 0) or "integrated-gradients" (its mean
            over `steps` midpoints of the path alpha = t, t in [0, 1]).
        steps: quadrature points for integrated gradients.
        execution: the memory/compute trade-offs (`jaxpatch.Execution`): `step_batch` path
            points run at once (vmapped; each holds its own mixed copy of the params and its
            own activations, so 1 keeps memory at one gradient's); `prompt_batch` prompts at a
            time (gradients accumulated); `remat` runs the gradient block by block, keeping
            only each block's input from the forward pass and recomputing its activations in
            its backward pass (one more forward pass of compute; memory of one block's
            activations; path points then run one at a time).

    Returns:
        A float32 tree shaped like the coefficients (`jaxpatch.patch.alpha_shapes`).

    Example:
        >>> grads = alpha_gradients(pair, jaxpatch.VectorAnchor(layer=1))
        >>> grads["layers"][0]["mlp"]["down_proj"]["weight"].shape  # one coefficient per neuron
        (64, 1)
    """
    check_mode("method", method, ATTRIBUTION_METHODS, JaxpatchError)
    check_mode("attribution direction", direction, PAIR_DIRECTIONS, JaxpatchError)
    if steps < 1:
        raise JaxpatchError(f"integrated gradients need at least 1 step, got {steps}")
    execution = execution_of(execution)
    step_batch, prompt_batch, remat = execution.step_batch, execution.prompt_batch, execution.remat
    config = pair.config
    if remat and metric.outputs(config):
        raise MetricError(f"the {metric.name} metric reads component outputs inside blocks: "
                          "the block-by-block gradient (remat) does not serve it")
    start, target = endpoints(pair.base, pair.donor, direction)
    state = pair.endpoints(metric).state
    batch = pair.batch_along(PROMPT_AXES)
    first_order = method == "first-order"
    n = 1 if first_order else steps
    ts = (np.arange(n) + 0.5) / n
    chunk_size = 1 if first_order or remat else step_batch
    step_chunks = [jnp.asarray(ts[i:i + chunk_size], jnp.float32) for i in range(0, n, chunk_size)]
    prompts = batch.tokens.shape[0]
    size = prompt_batch or prompts
    total = None
    for lo in range(0, prompts, size):
        hi = min(lo + size, prompts)
        whole = hi - lo == prompts
        chunk = batch if whole else _slice(batch, lo, hi)
        chunk_state = _slice(state, lo, hi) if metric.state_per_prompt and not whole else state
        weight = jnp.float32((hi - lo) / prompts / n)  # the metric is a mean over prompts and path points
        for t in step_chunks:
            if remat:
                at = start if first_order else _mix_all(t[0], start, target)
                grads = _scale(weight, _blockwise_gradients(config, metric, at, start, target,
                                                            chunk, chunk_state))
            else:
                grads = _gradient_function(config, metric, first_order)(
                    t, weight, start, target, chunk, chunk_state)
            total = grads if total is None else _add(total, grads)
    assert total is not None  # at least one prompt chunk and one path point ran
    return total


def component_scores(config: ModelConfig, grads: Params, items: Sequence[Component]) -> np.ndarray:
    """Sums a coefficient gradient over each component's entries.

    Arguments:
        config: the architecture.
        grads: a tree shaped like the coefficients (from `alpha_gradients`).
        items: the components to score.

    Returns:
        float64 `[len(items)]`: each component's share of the gradient.

    Example:
        >>> import jax
        >>> from jaxpatch.components import select
        >>> cfg = ModelConfig.tiny("llama")
        >>> ones = jax.tree_util.tree_map(jnp.ones_like, Patch.zeros(cfg).alpha)
        >>> component_scores(cfg, ones, select(cfg, "layers.0.mlp", "neuron"))[:2].tolist()
        [3.0, 3.0]
    """
    # An alpha leaf has one axis of size > 1 at most, so an indexed entry is one element.
    flat = {name: np.asarray(g, np.float64).reshape(-1) for name, g in flatten_params(grads).items()}
    out = np.empty(len(items))
    for start, stop in _module_runs(items):  # one vectorized gather per run of one module
        first = items[start]
        if first.key is None:
            out[start] = sum(flat[name].sum() for name in component_entries(config, first))
            continue
        index = np.fromiter((c.index for c in items[start:stop]), np.int64, stop - start)
        out[start:stop] = sum(flat[name][index]
                              for name, _ in indexed_leaves(config, first.path, first.key))
    return out


def _module_runs(items: Sequence[Component]) -> list[tuple[int, int]]:
    """[start, stop) of the runs of consecutive indexed components of one module and kind
    (each component without an index is a run of its own)."""
    runs: list[tuple[int, int]] = []
    start, n = 0, len(items)
    for i in range(1, n + 1):
        if i < n:
            c, first = items[i], items[start]
            if c.key is not None and c.key == first.key and (c.path is first.path
                                                               or c.path == first.path):
                continue
        runs.append((start, i))
        start = i
    return runs


def attribute(pair: PreparedPair, metric: Metric, *, granularity: Granularity = "module",
              selector: SelectorLike | None = None, method: AttributionMethod = "first-order",
              direction: PairDirection = "denoise", steps: int = 16,
              execution: Execution | None = None) -> SweepResult:
    """Attribution scores for every component, in the same table as `sweep`.

    A component's `score` is the predicted metric of the model with that component patched:
    the start model's score plus its attribution, so `recovery` and `effect` read as in
    `sweep`. For integrated gradients, `extra["completeness"]` compares the sum over all
    coefficients with `metric(target) - metric(start)`.

    Arguments:
        pair, metric: as for `sweep`.
        granularity, selector: which components to score.
        method: "first-order" or "integrated-gradients".
        direction: "denoise" or "noise".
        steps: quadrature points for integrated gradients.
        execution: memory/compute trade-offs (`step_batch`, `prompt_batch`, `remat`; see
            `alpha_gradients`) and the log of a resumable run: the finished table is recorded
            there and read back instead of recomputed (exactly: floats round-trip through
            JSON). On a mesh, params split along `model` and prompts along `candidates` and
            `data` together (attribution has no candidates).

    Returns:
        A `SweepResult` with `method` set.

    Example:
        >>> r = attribute(pair, jaxpatch.VectorAnchor(layer=1), granularity="head")
        >>> len(r.names), r.method
        (12, 'first-order')
    """
    pair.require_patches_everywhere("attribution")
    execution = execution_of(execution)
    if execution.log is not None:  # the finished table, recorded whole
        return execution.recorded("attribution", SweepResult, lambda settings: attribute(
            pair, metric, granularity=granularity, selector=selector, method=method,
            direction=direction, steps=steps, execution=settings))
    wall_start = time.perf_counter()
    config = pair.config
    ends = pair.endpoints(metric)
    base_score, donor_score = ends.base_score, ends.donor_score
    grads = alpha_gradients(pair, metric, direction=direction, method=method, steps=steps,
                            execution=execution)
    grads = jax.tree_util.tree_map(to_host, grads)  # split along `model` over several hosts
    items = select(config, selector, granularity)
    values = component_scores(config, grads, items)
    start_score = base_score if direction == "denoise" else donor_score
    extra: dict[str, Any] = {"steps": steps if method == "integrated-gradients" else 1}
    if method == "integrated-gradients":
        total = float(sum(np.asarray(g).sum() for g in jax.tree_util.tree_leaves(grads)))
        expected = (donor_score - base_score) * (1 if direction == "denoise" else -1)
        extra["completeness"] = {"sum_of_attributions": total, "score_difference": expected,
                                 "gap": total - expected,
                                 "relative_gap": abs(total - expected) / abs(expected)}
    check_finite_scores([c.name for c in items], values, "attribution")
    wall = time.perf_counter() - wall_start
    return SweepResult(metric=metric.name, direction=direction, readout_layer=metric.layer,
                       positions=pair.positions, base_score=base_score, donor_score=donor_score,
                       names=[c.name for c in items], scores=start_score + values,
                       timing={"wall_s": wall}, inputs=dict(pair.inputs), method=method,
                       extra=extra)
