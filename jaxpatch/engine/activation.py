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
residual stream and the source model's site values come from the prepared pair (once per
pair), and a candidate in block i runs from the stream before block i. Candidates are a leading
axis on the coefficients (`beta`) of the sites their block group edits, vmapped over in padded
chunks that compile once per group (the chunk runner, `jaxpatch.engine.chunks`). Candidates
after the metric's last block are reported as unchanged without running. Scores are on the sweep's scale,
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
from jax.sharding import Mesh

from jaxpatch.components import Component, SelectorLike, activation_sites, component_sites, select
from jaxpatch.engine.chunks import ChunkProgram, compile_programs, round_to_devices, run_chunks
from jaxpatch.engine.prepared import PreparedPair
from jaxpatch.errors import JaxpatchError, MetricError
from jaxpatch.mesh import place_params, place_prompts
from jaxpatch.metrics import Metric, read_metric
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.modes import PAIR_DIRECTIONS, Granularity, PairDirection, check_mode
from jaxpatch.prompts import Batch
from jaxpatch.results import ScoreMatrix, SweepResult, check_finite_scores, run_timing
from jaxpatch.runs.settings import Execution, execution_of

__all__ = ["activation_patching", "activation_matrix"]

_DEFAULT_CHUNK = 64
"""Candidates per vmapped batch unless `Execution.chunk_size` says otherwise."""

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


def _group_start(component: Component) -> int:
    """The block a component's run starts at (0 for embeddings, n_layers after the blocks)."""
    return max(component.layer, 0)


def _activation_scores(pair: PreparedPair, metric: Metric, candidates: Sequence[Component],
                       direction: PairDirection, execution: Execution,
                       wall_start: float) -> tuple[Any, Any, np.ndarray, dict[str, float]]:
    """Every item's raw score (`[n]` or `[n, width]`), with the endpoint scores and timing;
    chunks run in the chunk runner (resumable, halved on out-of-memory, split over a mesh)."""
    config, mesh, log = pair.config, pair.mesh, execution.log
    check_mode("activation patching direction", direction, PAIR_DIRECTIONS, JaxpatchError)
    start, source = ("base", "donor") if direction == "denoise" else ("donor", "base")
    ends = pair.endpoints(metric)
    last_block = config.n_layers - 1 if metric.layer is None else metric.layer
    _, residuals = pair.prefix(start, metric.layer)
    start_score = np.asarray(ends.base_score if start == "base" else ends.donor_score, np.float64)
    earlier = ends.readouts[start] if metric.outputs(config) else None
    sources = pair.sources(source, metric.layer)
    all_sites = activation_sites(config)
    params = pair.model(start).params

    groups: dict[int, list[Component]] = {}
    for component in candidates:
        first = _group_start(component)
        if first <= last_block or (metric.layer is None and first == config.n_layers):
            groups.setdefault(first, []).append(component)
    size = max(1, min(execution.chunk_size or _DEFAULT_CHUNK,
                      max((len(g) for g in groups.values()), default=1)))
    size = round_to_devices(size, mesh)
    programs = [_group_program(config, metric, first, group, size, all_sites, params, sources,
                               residuals, pair.batch, ends.state, earlier, mesh)
                for first, group in sorted(groups.items())]
    runs = sum(len(g) for g in groups.values())
    prepare_s = time.perf_counter() - wall_start
    compile_s = compile_programs(programs, mesh)
    resumed = 0 if log is None else log.recorded_candidates()
    scores = run_chunks(programs, label=f"activation {direction}", execution=execution, mesh=mesh)
    values = np.array([scores.get(c.name, start_score) for c in candidates], np.float64)
    check_finite_scores([c.name for c in candidates], values, "activation patching score")
    return ends.base_score, ends.donor_score, values, run_timing(wall_start, prepare_s, compile_s,
                                                                 runs - resumed)


def _group_program(config: ModelConfig, metric: Metric, first: int,
                   group: Sequence[Component], size: int, all_sites: dict[str, int],
                   params: Params, sources: dict[str, jax.Array], residuals: jax.Array,
                   batch: Batch, state: Any, earlier: Any, mesh: Mesh | None) -> ChunkProgram:
    """The program of one block group for the chunk runner (operands placed on the mesh)."""
    sites = {s: all_sites[s] for s in dict.fromkeys(
        s for c in group for s in component_sites(config, c))}

    def operands(_: int) -> _Operands:
        ops = _Operands(params, {s: sources[s] for s in sites},
                        residuals[first] if first > 0 else None, batch, state, earlier)
        if mesh is None:
            return ops
        return _Operands(place_params(mesh, ops.params),  # params split along `model`
                         *place_prompts(mesh, ops[1:], batch.tokens.shape[0]))

    return ChunkProgram(
        ("activation", config, metric, first, tuple(sites), mesh), _program(config, metric, first),
        size, [group], functools.lru_cache(maxsize=1)(operands),
        lambda chunk, at: _betas(config, chunk, at, sites),
        lambda at: {s: jax.ShapeDtypeStruct((at, n), jnp.float32) for s, n in sites.items()})


def activation_patching(
    pair: PreparedPair,
    metric: Metric,
    *,
    granularity: Granularity = "module",
    selector: SelectorLike | None = None,
    direction: PairDirection = "denoise",
    execution: Execution | None = None,
) -> SweepResult:
    """Scores every component by patching its output activation between base and donor.

    Arguments:
        pair: the base/donor pair and prompts (`jaxpatch.prepare`).
        metric: the behavioral interface.
        granularity: module, head, neuron or layer.
        selector: restrict to these components.
        direction: "denoise" (donor outputs into the base run) or "noise" (base outputs into
            the donor run).
        execution: chunk size (default 64 candidates per vmapped batch), progress and the log
            of a resumable run (`jaxpatch.Execution`).

    Returns:
        A `SweepResult` with `method="activation"`, in candidate order; components after the
        metric's anchor layer score exactly the unpatched model.

    Example:
        >>> r = activation_patching(pair, jaxpatch.KLDivergence())
        >>> r.method, len(r.names)
        ('activation', 21)
    """
    pair.require_patches_everywhere("activation patching")
    wall_start = time.perf_counter()
    if metric.width != 1:
        raise MetricError(f"the {metric.name} metric scores {metric.width} columns: use "
                          "activation_matrix for it")
    candidates = select(pair.config, selector, granularity)
    base_score, donor_score, values, timing = _activation_scores(
        pair, metric, candidates, direction, execution_of(execution), wall_start)
    return SweepResult(metric=metric.name, direction=direction, readout_layer=metric.layer,
                       positions=pair.positions, base_score=base_score, donor_score=donor_score,
                       names=[c.name for c in candidates], scores=values, timing=timing,
                       inputs=dict(pair.inputs), method="activation")


def activation_matrix(pair: PreparedPair, metric: Metric, candidates: Sequence[Component], *,
                      direction: PairDirection = "denoise",
                      execution: Execution | None = None) -> ScoreMatrix:
    """Activation patching of every candidate, read on every column of a metric (e.g. every
    target of a `ComponentAnchor` with several targets) from the same runs.

    Arguments:
        pair, metric: the run (`metric` may have any width).
        candidates: the components whose outputs are patched (the rows).
        direction, execution: as for `activation_patching`.

    Returns:
        A `ScoreMatrix` with `method="activation"`.

    Example:
        >>> metric = jaxpatch.ComponentAnchor(("layers.0.mlp", "layers.1.self_attn"))
        >>> m = activation_matrix(pair, metric, jaxpatch.select(cfg, "layers.0", "module"))
        >>> m.scores.shape
        (9, 2)
    """
    wall_start = time.perf_counter()
    base_score, donor_score, values, timing = _activation_scores(
        pair, metric, candidates, direction, execution_of(execution), wall_start)
    columns = list(metric.columns())
    return ScoreMatrix(metric=metric.name, direction=direction, method="activation",
                       names=[c.name for c in candidates], columns=columns,
                       base_scores=np.asarray(base_score, np.float64).reshape(-1),
                       donor_scores=np.asarray(donor_score, np.float64).reshape(-1),
                       scores=values.reshape(len(candidates), metric.width), timing=timing)
