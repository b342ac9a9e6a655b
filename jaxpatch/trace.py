"""Activation patching: the baseline that moves activations instead of weights.

For each component, the base model runs with that component's *output* replaced by the donor's
output on the same prompts (denoise), or the donor runs with the base's output (noise). Which
output a component owns:

    module   its own output (`layers.i.self_attn.q_proj`: the query projection; a norm: the
             normalized stream; `embed_tokens`: the embeddings; `lm_head`: the logits)
    head     `[head=h]`: head h's output before o_proj; `[kv_head=g]`: head g of the key and
             value projections
    neuron   `[neuron=n]`: the activation entering down_proj
    layer    the block's attention and MLP outputs

As in `jaxpatch.sweep`, nothing a candidate cannot change is computed again: the start model's
residual stream is computed once, and a candidate in block i runs from the stream before
block i. Candidates are a leading axis on the coefficients (`beta`) of the sites their block
group edits, vmapped over in padded chunks that compile once per group. Candidates after the
metric's last block are reported as unchanged without running. Scores are on the sweep's scale,
so the two methods' tables compare directly; `activation_matrix` reads every column of a
metric with several (a `ComponentAnchor` with several targets) from the same runs.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import without_layers
from jaxpatch.components import Component, SelectorLike, activation_sites, component_sites, select
from jaxpatch.engine.programs import compiled, prefix_pass, stacked_checked
from jaxpatch.errors import JaxpatchError, MetricError
from jaxpatch.io.runlog import TaskLog
from jaxpatch.mesh import (
    MeshLike,
    candidate_devices,
    candidate_specs,
    make_mesh,
    place_params,
    place_prompts,
    shard_candidates,
    to_host,
)
from jaxpatch.metrics import Metric, mean_score, metric_readout, read_metric
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.models.model import Model
from jaxpatch.modes import PAIR_DIRECTIONS, Granularity, PairDirection, Positions, check_mode
from jaxpatch.pair import check_pair, endpoint_scores, placed_on
from jaxpatch.prompts import Batch
from jaxpatch.results import ScoreMatrix, SweepResult, check_finite_scores, run_timing
from jaxpatch.rounding import jit

__all__ = ["activation_patching", "activation_matrix"]

Betas = dict[str, jax.Array]


def _betas(config: ModelConfig, chunk: Sequence[Component], size: int,
           sites: dict[str, int]) -> dict[str, np.ndarray]:
    """Per-site coefficients `[size, axis]` for a chunk (padding rows stay 0)."""
    out = {site: np.zeros((size, n), np.float32) for site, n in sites.items()}
    for row, component in enumerate(chunk):
        for site, index in component_sites(config, component).items():
            out[site][row, slice(None) if index is None else index] = 1.0
    return out


def _broadcast(beta: jax.Array, value: jax.Array) -> jax.Array:
    """A site's coefficients `[axis]` shaped to multiply its value: the axis is the value's
    third (heads) or last (neurons) axis."""
    if beta.shape[0] == 1:
        return beta.reshape(())
    if value.ndim == 4:  # [batch, seq, heads, head_dim]
        return beta[:, None]
    return beta


def _record(store: dict[str, jax.Array], site: str, value: jax.Array) -> jax.Array:
    store[site] = value
    return value


@functools.partial(jit, static_argnums=(0, 3))
def _sources(config: ModelConfig, params: Params, batch: Batch, layer: int | None) -> dict[str, jax.Array]:
    """Every site's output in a clean run of `params`."""
    store: dict[str, jax.Array] = {}
    forward(config, params, batch.tokens, batch.mask, stop_layer=layer,
            edit=functools.partial(_record, store))
    return store


class _Operands(NamedTuple):
    """What a group's program runs on, besides the coefficients (a pytree).

    Attributes:
        params: the start model's params.
        sources: the source model's values of the group's sites.
        residual: the start model's residual stream before the group's block (None from the
            embeddings).
        batch, state: the prompts and the metric's state.
        earlier: for a metric reading component outputs, the start model's readout.
    """

    params: Params
    sources: dict[str, jax.Array]
    residual: jax.Array | None
    batch: Batch
    state: Any
    earlier: Any


def _program(config: ModelConfig, metric: Metric, start_layer: int) -> Any:
    """`run(betas, operands) -> scores [chunk]` (or `[chunk, width]`) for the candidates of
    one block group: the start model from `start_layer` with each candidate's sites moved to
    the source's values."""

    def run(betas: dict[str, jax.Array], ops: _Operands) -> jax.Array:
        def one(beta: dict[str, jax.Array]) -> jax.Array:
            def edit(site: str, value: jax.Array) -> jax.Array:
                if site not in beta:
                    return value
                b = _broadcast(beta[site], value).astype(value.dtype)
                return value + b * (ops.sources[site] - value)

            # The whole sequence runs: every site's value keeps the shape of its source.
            x = read_metric(config, metric, ops.params, ops.batch, start_layer=start_layer,
                            residual=ops.residual, edit=edit, full_sequence=True,
                            earlier=ops.earlier)
            return jnp.mean(metric.score(x, ops.batch, ops.state), axis=0)

        return jax.vmap(one)(betas)

    return run


def _group_start(config: ModelConfig, component: Component) -> int:
    """The block a component's run starts at (0 for embeddings, n_layers after the blocks)."""
    return max(component.layer, 0)


def _activation_scores(base: Model, donor: Model, batch: Batch, metric: Metric,
                       items: Sequence[Component], direction: PairDirection, chunk_size: int,
                       progress: bool, wall_start: float, log: TaskLog | None,
                       mesh_spec: MeshLike | None) -> tuple[Any, Any, np.ndarray, dict[str, float]]:
    """Every item's raw score (`[n]` or `[n, width]`), with the endpoint scores and timing;
    chunks recorded in `log` are replayed, new ones recorded; on a mesh, each chunk's
    candidates are split across its devices."""
    config = base.config
    mesh = make_mesh(mesh_spec)  # a bad mesh is refused before any work
    check_pair(base, donor)
    base, donor, batch = placed_on(mesh, base, donor, batch)
    metric.check(config)
    check_mode("activation patching direction", direction, PAIR_DIRECTIONS, JaxpatchError)
    start, source = (base, donor) if direction == "denoise" else (donor, base)
    state, base_score, donor_score = endpoint_scores(config, base, donor, batch, metric)
    last_block = config.n_layers - 1 if metric.layer is None else metric.layer
    count = last_block + 2 if metric.layer is None else last_block + 1
    _, residuals = prefix_pass(config, stacked_checked(start.params, "start"),
                               without_layers(start.params), batch, metric.layer, count)
    start_readout = metric_readout(config, metric, start.params, batch)
    start_score = np.asarray(mean_score(metric, start_readout, batch, state), np.float64)
    earlier = start_readout if metric.outputs(config) else None
    sources = _sources(config, source.params, batch, metric.layer)
    all_sites = activation_sites(config)

    groups: dict[int, list[int]] = {}
    for i, component in enumerate(items):
        first = _group_start(config, component)
        if first <= last_block or (metric.layer is None and first == config.n_layers):
            groups.setdefault(first, []).append(i)
    size = max(1, min(chunk_size, max((len(g) for g in groups.values()), default=1)))
    split = candidate_devices(mesh)
    size = -(-size // split) * split
    scores: list[Any] = [start_score] * len(items)
    runs = sum(len(g) for g in groups.values())
    prepare_s, compile_s = time.perf_counter() - wall_start, 0.0
    from tqdm.auto import tqdm

    resumed = 0 if log is None else log.recorded_candidates()
    with tqdm(total=runs, initial=min(resumed, runs), unit="cand",
              desc=f"activation {direction}" + (f" (resumed {resumed})" if resumed else ""),
              disable=not progress, dynamic_ncols=True) as bar:
        for first, group in sorted(groups.items()):
            members = [items[i] for i in group]
            sites = {s: all_sites[s] for s in dict.fromkeys(
                s for c in members for s in component_sites(config, c))}
            ops = _Operands(start.params, {s: sources[s] for s in sites},
                            residuals[first] if first > 0 else None, batch, state, earlier)
            if mesh is not None:  # params split along `model`, prompts along `data`
                ops = _Operands(place_params(mesh, ops.params),
                                *place_prompts(mesh, ops[1:], batch.tokens.shape[0]))
            key = ("activation", config, metric, first, tuple(sites), mesh)
            fn = _program(config, metric, first)
            compile_start = time.perf_counter()
            specs = {s: jax.ShapeDtypeStruct((size, n), jnp.float32) for s, n in sites.items()}
            program = compiled(key, fn, specs if mesh is None else candidate_specs(mesh, specs),
                               ops)
            compile_s += time.perf_counter() - compile_start
            names = [c.name for c in members]
            offset = 0
            while offset < len(group):
                values = None if log is None else log.replay(names, offset)
                if values is None:
                    chunk = members[offset: offset + size]
                    rows = _betas(config, chunk, size, sites)
                    betas = ({k: jnp.asarray(v) for k, v in rows.items()} if mesh is None
                             else shard_candidates(mesh, rows))
                    values = to_host(program(betas, ops)).astype(np.float64)[: len(chunk)]
                    if log is not None:
                        log.record_chunk(names[offset: offset + len(chunk)], values)
                    bar.update(len(chunk))
                for row, i in enumerate(group[offset: offset + len(values)]):
                    scores[i] = values[row]
                offset += len(values)
    values = np.array(scores, np.float64)
    check_finite_scores([c.name for c in items], values, "activation patching score")
    return base_score, donor_score, values, run_timing(wall_start, prepare_s, compile_s,
                                                       runs - resumed)


def activation_patching(
    base: Model,
    donor: Model,
    batch: Batch,
    metric: Metric,
    *,
    granularity: Granularity = "module",
    selector: SelectorLike | None = None,
    direction: PairDirection = "denoise",
    chunk_size: int = 64,
    progress: bool = True,
    positions: Positions = "last",
    inputs: dict[str, Any] | None = None,
    log: TaskLog | None = None,
    mesh: MeshLike | None = None,
) -> SweepResult:
    """Scores every component by patching its output activation between base and donor.

    Arguments:
        base, donor: the pair (same architecture).
        batch: prompts and readout positions.
        metric: the behavioral interface.
        granularity: module, head, neuron or layer.
        selector: restrict to these components.
        direction: "denoise" (donor outputs into the base run) or "noise" (base outputs into
            the donor run).
        chunk_size: candidates per vmapped batch (chunks are padded to this size).
        progress: show a progress bar.
        positions, inputs: recorded in the result.
        log: record finished chunks here and replay the ones it holds (a resumable run).
        mesh: split each chunk's candidates across devices, as for `sweep`.

    Returns:
        A `SweepResult` with `method="activation"`, in candidate order; components after the
        metric's anchor layer score exactly the unpatched model.

    Example:
        >>> r = activation_patching(base, donor, batch, jaxpatch.KLDivergence(), progress=False)
        >>> r.method, len(r.names)
        ('activation', 21)
    """
    wall_start = time.perf_counter()
    if metric.width != 1:
        raise MetricError(f"the {metric.name} metric scores {metric.width} columns: use "
                          "activation_matrix for it")
    items = select(base.config, selector, granularity)
    base_score, donor_score, values, timing = _activation_scores(
        base, donor, batch, metric, items, direction, chunk_size, progress, wall_start, log, mesh)
    return SweepResult(metric.name, direction, metric.layer, positions, base_score, donor_score,
                       [c.name for c in items], values, timing, dict(inputs or {}),
                       method="activation")


def activation_matrix(base: Model, donor: Model, batch: Batch, metric: Metric,
                      candidates: Sequence[Component], *, direction: PairDirection = "denoise",
                      chunk_size: int = 64, progress: bool = True,
                      log: TaskLog | None = None, mesh: MeshLike | None = None) -> ScoreMatrix:
    """Activation patching of every candidate, read on every column of a metric (e.g. every
    target of a `ComponentAnchor` with several targets) from the same runs.

    Arguments:
        base, donor, batch, metric: the run (`metric` may have any width).
        candidates: the components whose outputs are patched (the rows).
        direction, chunk_size, progress, log, mesh: as for `activation_patching`.

    Returns:
        A `ScoreMatrix` with `method="activation"`.

    Example:
        >>> metric = jaxpatch.ComponentAnchor(("layers.0.mlp", "layers.1.self_attn"))
        >>> m = activation_matrix(base, donor, batch, metric,
        ...                       jaxpatch.select(cfg, "layers.0", "module"), progress=False)
        >>> m.scores.shape
        (9, 2)
    """
    wall_start = time.perf_counter()
    base_score, donor_score, values, timing = _activation_scores(
        base, donor, batch, metric, candidates, direction, chunk_size, progress, wall_start, log,
        mesh)
    columns = list(metric.columns())
    return ScoreMatrix(metric.name, direction, "activation", [c.name for c in candidates], columns,
                       np.asarray(base_score, np.float64).reshape(-1),
                       np.asarray(donor_score, np.float64).reshape(-1),
                       values.reshape(len(candidates), metric.width), timing)
