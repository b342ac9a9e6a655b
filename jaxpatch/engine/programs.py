"""The compiled programs of a sweep, their operands, and the cache that keeps them.

Two programs score a chunk of candidates, each vmapped over the chunk's coefficients:

- `local_program`: candidates that patch one block, whose index is traced, so one compiled
  program serves every block: the patched block on the cached residual before it, then the
  shared blocks up to the readout block, computed at the readout positions only;
- `general_program`: candidates that patch several blocks, the embeddings or the final
  modules: the plain forward from their first block with the patched leaves mixed.

Patched leaves are `MixedWeight(start, target, alpha)`: kept factored, a matmul never builds a
patched weight per candidate (`dense=True` builds them when that is cheaper). Every program
takes the chunk's coefficients first and its operands (a pytree) second.

`prefix_pass` computes, once per model, what the metric reads and the residual stream before
every block (where candidates start from).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxpatch._tree import flatten_params, replace_leaves
from jaxpatch.errors import NonFiniteError
from jaxpatch.metrics import Metric, read_metric
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import (
    MixedWeight,
    attention_allowed,
    block,
    embed,
    forward,
    layer_at,
    rope_at,
    rope_tables,
    run_blocks,
    stack_layers,
    unembed,
    window_at,
)
from jaxpatch.prompts import Batch
from jaxpatch.rounding import COMPILER_OPTIONS, jit

__all__ = ["Alphas", "LocalOperands", "GeneralOperands", "local_program", "general_program",
           "compiled", "prefix_pass", "stacked_checked", "check_finite", "leaves_named",
           "clean_sites"]

Alphas = dict[str, jax.Array]
"""A chunk's coefficients: signature leaf -> `[chunk, *alpha shape]`."""


class LocalOperands(NamedTuple):
    """What `local_program` runs on, besides the coefficients (a pytree).

    Attributes:
        stacked: the start model's blocks, stacked (`stack_layers`).
        targets: the target model's signature leaves of the patched block (its own arrays,
            not copies).
        rest: the start model's params outside the blocks.
        residual: the residual stream before the patched block, `[P, S, d_model]`.
        index: the patched block (int32 scalar).
        batch: the prompts.
        state: the metric's state.
        where: the positions the patches apply at (`MixedWeight.where`), or None: everywhere.
    """

    stacked: Params
    targets: dict[str, jax.Array]
    rest: Params
    residual: jax.Array
    index: jax.Array
    batch: Batch
    state: Any
    where: jax.Array | None = None


class GeneralOperands(NamedTuple):
    """What `general_program` runs on, besides the coefficients (a pytree).

    Attributes:
        start: the start model's params.
        targets: the target model's signature leaves (dotted names).
        residual: the residual stream before the first block run, or None from the embeddings.
        batch: the prompts.
        state: the metric's state.
        earlier: for a metric that reads component outputs, the start model's readout (the
            outputs of blocks before the first block run); else None.
        where: the positions the patches apply at (`MixedWeight.where`), or None: everywhere.
    """

    start: Params
    targets: dict[str, jax.Array]
    residual: jax.Array | None
    batch: Batch
    state: Any
    earlier: Any = None
    where: jax.Array | None = None


def _mixed(leaves: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
           alpha: Mapping[str, jax.Array], dense: bool, where: jax.Array | None) -> dict[str, Any]:
    """The patched leaves as `MixedWeight`s (at the positions `where` chooses), or their
    materialized values (patches that apply everywhere)."""
    mixed = {n: MixedWeight(leaves[n], targets[n], alpha[n], where) for n in alpha}
    return {n: m.value() for n, m in mixed.items()} if dense and where is None else mixed


def _check_chunk(alphas: Alphas, residual: jax.Array | None) -> None:
    """Trace-time invariants of a program's inputs (a failure is a bug, not bad input)."""
    chex.assert_equal_shape_prefix(list(alphas.values()), 1)
    if residual is not None:
        chex.assert_rank(residual, 3)


def local_program(config: ModelConfig, metric: Metric,
                  dense: bool) -> Callable[[Alphas, LocalOperands], jax.Array]:
    """Scores `[chunk]` of candidates that all patch one block, whose index is traced: one
    compiled program serves every block.

    Arguments:
        config: the architecture.
        metric: the metric (its anchor block ends the run; None: logits).
        dense: materialize each candidate's patched weights.

    Returns:
        `run(alphas, operands) -> scores`.
    """
    stop = metric.layer
    last = config.n_layers - 1 if stop is None else stop

    def run(alphas: Alphas, ops: LocalOperands) -> jax.Array:
        _check_chunk(alphas, ops.residual)
        batch = ops.batch
        rope = rope_tables(config, batch.tokens.shape[1], ops.residual.dtype)
        layer = layer_at(ops.stacked, ops.index)
        flat = flatten_params(layer)
        allowed = attention_allowed(batch.mask, window_at(config, ops.index))
        own_rope = rope_at(config, rope, ops.index)

        def one(alpha: Alphas) -> jax.Array:
            patched = replace_leaves(layer, _mixed(flat, ops.targets, alpha, dense, ops.where))

            def patched_is_readout(x: jax.Array) -> jax.Array:
                return block(config, patched, x, allowed, own_rope, batch.positions)[0]

            def patched_then_rest(x: jax.Array) -> jax.Array:
                x = block(config, patched, x, allowed, own_rope)[0]
                x = run_blocks(config, ops.stacked, x, batch.mask, rope, ops.index + 1, last)
                readout_allowed = attention_allowed(batch.mask, window_at(config, last))
                return block(config, layer_at(ops.stacked, last), x, readout_allowed,
                             rope_at(config, rope, last), batch.positions)[0]

            x = jax.lax.cond(ops.index == last, patched_is_readout, patched_then_rest,
                             ops.residual)
            if stop is None:
                x = unembed(config, ops.rest, x)
            return jnp.mean(metric.score(x, batch, ops.state), axis=0)

        return jax.vmap(one)(alphas)

    return run


def general_program(config: ModelConfig, metric: Metric, start_layer: int,
                    dense: bool) -> Callable[[Alphas, GeneralOperands], jax.Array]:
    """Scores `[chunk]` of candidates that may patch several blocks, the embeddings or the
    final modules: the plain forward from `start_layer` with the signature leaves mixed.

    Arguments:
        config: the architecture.
        metric: the metric (its anchor block ends the run; None: logits).
        start_layer: the first block run (0 and no residual: from the embeddings).
        dense: materialize each candidate's patched weights.

    Returns:
        `run(alphas, operands) -> scores`: `[chunk]`, or `[chunk, width]` for a metric with
        several columns.
    """

    def run(alphas: Alphas, ops: GeneralOperands) -> jax.Array:
        _check_chunk(alphas, ops.residual)
        flat = flatten_params(ops.start)

        def one(alpha: Alphas) -> jax.Array:
            params = replace_leaves(ops.start, _mixed(flat, ops.targets, alpha, dense, ops.where))
            x = read_metric(config, metric, params, ops.batch, start_layer=start_layer,
                            residual=ops.residual, earlier=ops.earlier)
            return jnp.mean(metric.score(x, ops.batch, ops.state), axis=0)

        return jax.vmap(one)(alphas)

    return run


_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_COMPILED_MAX = 64  # compiled programs kept, least recently used dropped first


def compiled(key: Any, fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """`fn` jitted and compiled for the shapes (and placements) of `args` (arrays or
    `ShapeDtypeStruct`s), cached under `key` (the static settings `fn` was built from) and them.

    Example:
        >>> double = compiled("double", lambda x: 2 * x, jax.ShapeDtypeStruct((2,), jnp.float32))
        >>> double(jnp.ones(2)).tolist()
        [2.0, 2.0]
    """
    shapes = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype), _placement(x)), args)
    full_key = (key, jax.tree_util.tree_structure(args), tuple(jax.tree_util.tree_leaves(shapes)))
    if full_key not in _COMPILED:
        _COMPILED[full_key] = jax.jit(fn, compiler_options=COMPILER_OPTIONS).lower(*args).compile()
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(full_key)
    return _COMPILED[full_key]


def _placement(x: Any) -> Any:
    """What of an argument's placement a compiled program depends on: its mesh sharding, or
    None on one device (a `ShapeDtypeStruct` without one and an array there compile alike)."""
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


@jit
def _stack_and_check(params: Params) -> tuple[Params, Params]:
    """The blocks stacked (`stack_layers`), and per leaf whether it is all finite."""
    return stack_layers(params["layers"]), _finite(params)


@jit
def _finite(params: Params) -> Params:
    """Per leaf, whether it is all finite."""
    return jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)


def check_finite(params: Params, which: str, finite: Params | None = None) -> None:
    """Refuses NaN or Inf in any tensor of a params tree, naming it.

    Arguments:
        params: the params.
        which: the model's role in messages ("base", "donor", "ablation target").
        finite: the per-leaf flags, when already computed.

    Raises:
        NonFiniteError: naming the tensor.

    Example:
        >>> check_finite(base.params, "base")  # nothing to say
    """
    for name, ok in flatten_params(_finite(params) if finite is None else finite).items():
        if not bool(ok):
            raise NonFiniteError(f"{which} tensor {name!r} holds NaN or Inf")


def stacked_checked(params: Params, which: str) -> Params:
    """A model's blocks stacked along a leading axis, refusing NaN or Inf in any tensor.

    Arguments:
        params: the model's params.
        which: the model's role in messages ("base", "donor", "ablation target").

    Raises:
        NonFiniteError: naming the tensor.

    Example:
        >>> stacked_checked(base.params, "base")["mlp"]["down_proj"]["weight"].shape
        (2, 64, 32)
    """
    stacked, finite = _stack_and_check(params)
    check_finite(params, which, finite)
    return stacked


def leaves_named(params: Params, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """The named leaves of a params tree (dotted names relative to the tree given): the
    arrays themselves, not copies.

    Example:
        >>> leaves = leaves_named(donor.params, ("norm.weight",))
        >>> leaves["norm.weight"] is donor.params["norm"]["weight"]
        True
    """
    flat = flatten_params(params)
    return {n: flat[n] for n in names}


@functools.partial(jit, static_argnums=(0, 4, 5))
def prefix_pass(config: ModelConfig, stacked: Params, rest: Params, batch: Batch,
                layer: int | None, count: int) -> tuple[jax.Array, jax.Array]:
    """One pass over stacked blocks (one compiled block whatever the depth).

    Arguments:
        config: the architecture.
        stacked: the model's blocks, stacked; `rest`: its params outside the blocks.
        batch: the prompts.
        layer: the metric's anchor block (None: logits).
        count: how many residual streams to return: before blocks 0 .. count - 1 (an entry at
            n_layers is the stream after the last block).

    Returns:
        `(readout, residuals)`: what the metric reads (`metrics.readout`) and the residual
        streams `[count, P, S, d_model]`.

    Example:
        >>> from jaxpatch._tree import without_layers
        >>> x, before = prefix_pass(cfg, stacked_checked(base.params, "base"),
        ...                         without_layers(base.params), batch, 1, 2)
        >>> x.shape, before.shape
        ((3, 1, 32), (2, 3, 5, 32))
    """
    x = embed(config, rest, batch.tokens)
    rope = rope_tables(config, batch.tokens.shape[1], x.dtype)
    last = config.n_layers - 1 if layer is None else layer

    def step(h: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        allowed = attention_allowed(batch.mask, window_at(config, i))
        return block(config, layer_at(stacked, i), h, allowed, rope_at(config, rope, i))[0], h

    h, before = jax.lax.scan(step, x, jnp.arange(last))
    before = jnp.concatenate([before, h[None]])  # before blocks 0 .. last
    allowed = attention_allowed(batch.mask, window_at(config, last))
    last_rope = rope_at(config, rope, last)
    if count > last + 1:  # the final modules need the stream after block `last` everywhere
        after = block(config, layer_at(stacked, last), h, allowed, last_rope)[0]
        before = jnp.concatenate([before, after[None]])
        readout_x = jnp.take_along_axis(after, batch.positions[..., None], axis=1)
    else:
        readout_x = block(config, layer_at(stacked, last), h, allowed, last_rope, batch.positions)[0]
    return (readout_x if layer is not None else unembed(config, rest, readout_x)), before[:count]


@functools.partial(jit, static_argnums=(0, 3))
def clean_sites(config: ModelConfig, params: Params, batch: Batch,
                layer: int | None) -> dict[str, jax.Array]:
    """Every activation site's value (`components.activation_sites`) in a clean run of
    `params` up to block `layer` (None: through the logits): what activation patching moves.

    Example:
        >>> sites = clean_sites(cfg, base.params, batch, 0)
        >>> sites["layers.0.mlp.neurons"].shape
        (3, 5, 64)
    """
    store: dict[str, jax.Array] = {}

    def record(site: str, value: jax.Array) -> jax.Array:
        store[site] = value
        return value

    forward(config, params, batch.tokens, batch.mask, stop_layer=layer, edit=record)
    return store
