"""`sweep`: exhaustive, exact patch scores, read as prepare -> plan -> compile -> execute.

`sweep` scores every candidate patch with the same numbers as patching it alone and running
the plain forward, but never computes what a candidate does not change:

- the start model's residual stream is computed once; a candidate whose first patched block is
  i starts from the cached residual before block i;
- candidates are grouped by their first patched block; a group's candidates are a leading axis
  on their coefficients (`jax.vmap`), so the rest of the network runs once on their
  activations stacked into the batch axis, with the shared weights;
- patched leaves stay factored (`MixedWeight`): no weight copy per candidate;
- a metric reading block L stops there, computing block L only at the readout positions;
  candidates after L are reported as exactly unchanged without running;
- chunks are padded to one size per program so each program compiles once;
- chunks run in the one chunk runner (`jaxpatch.engine.chunks`): with a log, every finished
  chunk is recorded and a resumed run replays the recorded chunks with their boundaries
  (bitwise equal to an uninterrupted run); running out of device memory halves the chunk;
- both models' prefix passes and the metric's endpoints come from the prepared pair
  (`jaxpatch.engine.prepared`), computed once per pair whatever the number of sweeps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpatch._tree import flatten_params, without_layers
from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.engine.chunks import ChunkProgram, compile_programs, round_to_devices, run_chunks
from jaxpatch.engine.plan import (
    Candidate,
    ProgramPlan,
    alpha_rows,
    auto_chunk_size,
    available_memory_bytes,
    candidates_of,
    plan_programs,
)
from jaxpatch.engine.prepared import PreparedPair, Which
from jaxpatch.engine.programs import (
    GeneralOperands,
    LocalOperands,
    check_finite,
    general_program,
    leaves_named,
    local_program,
)
from jaxpatch.errors import MetricError
from jaxpatch.mesh import (
    axis_size,
    broadcast_json,
    candidate_devices,
    place_leaves,
    place_params,
    place_prompts,
    replicate,
)
from jaxpatch.metrics import Metric
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.modes import Direction, Granularity
from jaxpatch.pair import endpoints
from jaxpatch.patch import Patch
from jaxpatch.prompts import Batch
from jaxpatch.results import ScoreMatrix, SweepResult, check_finite_scores, run_timing
from jaxpatch.runs.log import TaskLog, memo
from jaxpatch.runs.settings import Execution, execution_of

__all__ = ["sweep", "sweep_matrix"]

@dataclasses.dataclass(frozen=True)
class _Prepared:
    """What every program of a sweep shares: the endpoints and the start model's prefix.

    Attributes:
        start, target: the params a patch moves from and towards (`pair.endpoints`).
        start_stacked: the start model's blocks, stacked (the one copy of params a sweep
            adds; the target's differences are made per block as its candidates run).
        residuals: the start model's residual stream before each block that may run.
        start_readout: what the metric reads from the start model.
        state, base_score, donor_score, start_score: the metric's state and scores (floats,
            or `[width]` arrays for a metric with several columns).
    """

    start: Params
    target: Params
    start_stacked: Params
    residuals: jax.Array
    start_readout: Any
    state: Any
    base_score: Any
    donor_score: Any
    start_score: Any


def _prepare(pair: PreparedPair, metric: Metric, direction: Direction,
             references: Sequence[Params] | None) -> _Prepared:
    """The sweep's endpoints from the prepared pair: both models' prefix passes (computed once
    per pair and readout layer), the metric fitted, the start model's blocks stacked."""
    start, target = endpoints(pair.base, pair.donor, direction, references)
    which = pair.which(start)
    assert which is not None  # the start is always the base or the donor
    other: Which = "donor" if which == "base" else "base"
    pair.prefix(other, metric.layer)  # the start model's pass last: its stacked copy stays
    _, residuals = pair.prefix(which, metric.layer)
    ends = pair.endpoints(metric)
    if target is not pair.base.params and target is not pair.donor.params:  # an ablation target
        check_finite(target, "target")
    start_score = np.asarray(ends.base_score if which == "base" else ends.donor_score, np.float64)
    return _Prepared(start, target, pair.stacked(which), residuals, ends.readouts[which],
                     ends.state, ends.base_score, ends.donor_score, start_score)


def _program(config: ModelConfig, metric: Metric, plan: ProgramPlan, prepared: _Prepared,
             batch: Batch, mesh: Mesh | None, where: jax.Array | None) -> ChunkProgram:
    """A plan's program for the chunk runner: its cache key, function, coefficient rows, and
    the maker of each group's operands (on a mesh: params split along `model`, prompts along
    `data`, the rest whole on every device)."""
    size = round_to_devices(plan.chunk, mesh)

    def rows(chunk: Sequence[Candidate], at: int) -> dict[str, np.ndarray]:
        return alpha_rows(config, dataclasses.replace(plan, chunk=at), chunk)

    def specs(at: int) -> dict[str, jax.ShapeDtypeStruct]:
        return dataclasses.replace(plan, chunk=at).alpha_specs(config)

    prompts = batch.tokens.shape[0]

    def on_mesh(params: Params, stacked: bool = False) -> Params:
        return params if mesh is None else place_params(mesh, params, stacked)

    def leaves(named: dict[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
        return named if mesh is None else place_leaves(mesh, named, prefix)

    def per_prompt(tree: Any) -> Any:
        return tree if mesh is None else place_prompts(mesh, tree, prompts)

    whole = (lambda x: x) if mesh is None else (lambda x: replicate(mesh, x))
    where = per_prompt(where)
    restricted = where is not None
    if plan.kind == "local":
        key = ("local", config, metric, plan.signature, plan.dense, mesh, restricted)
        fn = local_program(config, metric, plan.dense)
        stacked = on_mesh(prepared.start_stacked, stacked=True)
        rest = on_mesh(without_layers(prepared.start))
        shared = per_prompt((batch, prepared.state))

        def local(i: int) -> LocalOperands:
            layer = plan.groups[i][0].first_layer
            targets = leaves(leaves_named(prepared.target["layers"][layer], plan.signature),
                             f"layers.{layer}.")
            return LocalOperands(stacked, targets, rest, per_prompt(prepared.residuals[layer]),
                                 whole(jnp.int32(layer)), *shared, where=where)

        return ChunkProgram(key, fn, size, plan.groups, local, rows, specs)
    key = ("general", config, metric, plan.start_layer, plan.signature, plan.dense, mesh,
           restricted)
    fn = general_program(config, metric, plan.start_layer, plan.dense)
    first_layer = plan.groups[0][0].first_layer
    residual = None if first_layer < 0 else prepared.residuals[plan.start_layer]
    earlier = prepared.start_readout if metric.outputs(config) else None
    start = on_mesh(prepared.start)
    targets = leaves(leaves_named(prepared.target, plan.signature), "")
    placed = per_prompt((residual, batch, prepared.state, earlier))

    def general(i: int) -> GeneralOperands:
        return GeneralOperands(start, targets, *placed, where=where)

    return ChunkProgram(key, fn, size, plan.groups, general, rows, specs)


def sweep(
    pair: PreparedPair,
    metric: Metric,
    *,
    granularity: Granularity = "module",
    selector: SelectorLike | None = None,
    candidates: Sequence[Component] | Mapping[str, Patch] | None = None,
    direction: Direction = "denoise",
    references: Sequence[Params] | None = None,
    execution: Execution | None = None,
) -> SweepResult:
    """Scores every candidate patch exactly.

    Arguments:
        pair: the base/donor pair and prompts (`jaxpatch.prepare`).
        metric: the behavioral interface (`VectorAnchor`, `LogitDiff`, `KLDivergence`, ...).
        granularity: module, head, neuron or layer (when `candidates` is None).
        selector: restrict to these components (default: all of the granularity).
        candidates: explicit components, or a mapping of names to custom `Patch`es.
        direction: "denoise" (donor weights into base), "noise" (base weights into donor),
            "zero" or "mean" (ablate the donor's components to zero or to the mean of
            `references`).
        references: params of reference models for mean ablation.
        execution: chunk size, memory, progress and the log of a resumable run
            (`jaxpatch.Execution`); the scores are the same whatever it says, to float32
            rounding.

    Returns:
        A `SweepResult` in candidate order.

    Raises:
        NonFiniteError: a weight or a score is NaN or infinite.
        MetricError: base and donor score the same.

    Example:
        >>> r = sweep(pair, jaxpatch.VectorAnchor(layer=1))
        >>> len(r.names), r.names[0]
        (21, 'embed_tokens')
    """
    if metric.width != 1:
        raise MetricError(f"the {metric.name} metric scores {metric.width} columns: use "
                          "sweep_matrix for it")
    if candidates is None:
        candidates = select(pair.config, selector, granularity)
    wall_start = time.perf_counter()
    prepared, names, values, timing, skipped = _scores(
        pair, metric, candidates, direction, references, execution_of(execution), wall_start)
    check_finite_scores(names, values, "score")
    return SweepResult(metric=metric.name, direction=direction, readout_layer=metric.layer,
                       positions=pair.positions, base_score=float(prepared.base_score),
                       donor_score=float(prepared.donor_score), names=names, scores=values,
                       timing=timing, inputs=dict(pair.inputs), skipped=skipped,
                       patch_at=pair.patch_at)


def sweep_matrix(
    pair: PreparedPair,
    metric: Metric,
    candidates: Sequence[Component] | Mapping[str, Patch],
    *,
    direction: Direction = "denoise",
    references: Sequence[Params] | None = None,
    execution: Execution | None = None,
) -> ScoreMatrix:
    """Scores every candidate patch exactly on every column of a metric: one run per
    candidate reads them all (e.g. every target of a `ComponentAnchor` with several targets).

    Arguments:
        pair, metric: as for `sweep` (`metric` may have any width).
        candidates: components, or a mapping of names to custom `Patch`es (the rows).
        direction, references, execution: as for `sweep`.

    Returns:
        A `ScoreMatrix`: rows in candidate order, one column per metric column.

    Example:
        >>> metric = jaxpatch.ComponentAnchor(("layers.0.mlp", "layers.1.self_attn"))
        >>> m = sweep_matrix(pair, metric, jaxpatch.select(cfg, "layers.0", "module"))
        >>> m.scores.shape, m.columns
        ((9, 2), ['layers.0.mlp', 'layers.1.self_attn'])
    """
    wall_start = time.perf_counter()
    prepared, names, values, timing, _ = _scores(
        pair, metric, candidates, direction, references, execution_of(execution), wall_start)
    values = values.reshape(len(names), metric.width)
    check_finite_scores(names, values, "score")
    columns = list(metric.columns())
    return ScoreMatrix(metric=metric.name, direction=direction, method="exact", names=names,
                       columns=columns,
                       base_scores=np.asarray(prepared.base_score, np.float64).reshape(-1),
                       donor_scores=np.asarray(prepared.donor_score, np.float64).reshape(-1),
                       scores=values, timing=timing)


def _scores(pair: PreparedPair, metric: Metric,
            candidates: Sequence[Component] | Mapping[str, Patch], direction: Direction,
            references: Sequence[Params] | None, execution: Execution, wall_start: float
            ) -> tuple[_Prepared, list[str], np.ndarray, dict[str, float], list[str]]:
    """prepare -> plan -> compile -> execute: the raw scores of every candidate (`[n]` or
    `[n, width]`), with the prepared endpoints, timing, and the names skipped."""
    config, mesh, log = pair.config, pair.mesh, execution.log
    prepared = _prepare(pair, metric, direction, references)
    cands = candidates_of(config, candidates)
    last_block = config.n_layers - 1 if metric.layer is None else metric.layer
    runs = [c.first_layer <= last_block or (metric.layer is None and c.first_layer == config.n_layers)
            for c in cands]
    run = [c for c, r in zip(cands, runs) if r]
    skipped = [c.name for c, r in zip(cands, runs) if not r]
    memory = _memory_plan(config, pair.batch, execution.memory_fraction, log, mesh)
    chunk_size = execution.chunk_size
    if log is not None and log.limit is not None:  # this run ran out of memory before
        chunk_size = min(chunk_size or memory["auto_chunk"], log.limit)
    plans = plan_programs(
        # a metric that reads inside blocks runs the plain forward (no block-local program)
        config, run, -1 if metric.outputs(config) else last_block,
        leaf_bytes={n: int(np.prod(a.shape)) * a.dtype.itemsize
                    for n, a in flatten_params(prepared.start).items()},
        chunk_size=chunk_size, auto_chunk=memory["auto_chunk"],
        materialize=execution.materialize, budget=memory["budget"])
    programs = [_program(config, metric, plan, prepared, pair.batch, mesh, pair.patch_where)
                for plan in plans]
    prepare_s = time.perf_counter() - wall_start
    compile_s = compile_programs(programs, mesh)

    resumed = 0 if log is None else log.recorded_candidates()
    scores = {name: prepared.start_score for name in skipped}
    scores.update(run_chunks(programs, label=f"sweep {direction}", execution=execution, mesh=mesh))
    names = [c.name for c in cands]
    values = np.array([scores[n] for n in names], np.float64)
    timing = run_timing(wall_start, prepare_s, compile_s, len(run) - resumed)
    if resumed:
        timing["resumed_candidates"] = float(resumed)
    return prepared, names, values, timing, skipped


def _memory_plan(config: ModelConfig, batch: Batch, memory_fraction: float,
                 log: TaskLog | None, mesh: Mesh | None) -> dict[str, int]:
    """The byte budget of a chunk on one device and the chunk size it allows (over all of a
    mesh's candidate devices), from free device memory; a resumed run reuses its first
    start's (so its chunks, and bits, are the same)."""
    def measure() -> dict[str, int]:
        budget = int(available_memory_bytes() * memory_fraction)
        per_device = auto_chunk_size(config, batch, budget, axis_size(mesh, "model"),
                                     axis_size(mesh, "data"))
        plan = {"budget": budget, "auto_chunk": per_device * candidate_devices(mesh)}
        return broadcast_json(plan)  # every process of a multi-process run chunks alike

    return memo(log, "memory", measure)
