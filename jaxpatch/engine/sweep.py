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
- with a `TaskLog` (`jaxpatch.io.runlog`), every finished chunk is recorded and a resumed run
  replays the recorded chunks with their boundaries, computing only the rest (bitwise equal to
  an uninterrupted run); running out of device memory halves the chunk and carries on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpatch._tree import flatten_params, without_layers
from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.engine.plan import (
    Candidate,
    ProgramPlan,
    alpha_rows,
    auto_chunk_size,
    available_memory_bytes,
    candidates_of,
    is_out_of_memory,
    plan_programs,
)
from jaxpatch.engine.programs import (
    GeneralOperands,
    LocalOperands,
    check_finite,
    compiled,
    general_program,
    leaves_named,
    local_program,
    prefix_pass,
    stacked_checked,
)
from jaxpatch.errors import JaxpatchError, MetricError
from jaxpatch.io.runlog import TaskLog, memo
from jaxpatch.mesh import (
    MeshLike,
    axis_size,
    broadcast_json,
    candidate_devices,
    candidate_specs,
    make_mesh,
    place_leaves,
    place_params,
    place_prompts,
    replicate,
    shard_candidates,
    to_host,
)
from jaxpatch.metrics import Metric, mean_score, metric_readout
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.model import Model
from jaxpatch.modes import Direction, Granularity, Positions
from jaxpatch.pair import check_pair, endpoint_scores, endpoints, placed_on
from jaxpatch.patch import Patch
from jaxpatch.prompts import Batch
from jaxpatch.results import ScoreMatrix, SweepResult, check_finite_scores, run_timing

__all__ = ["sweep", "sweep_matrix"]

_LOG = logging.getLogger("jaxpatch")


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


def _prepare(base: Model, donor: Model, batch: Batch, metric: Metric, direction: Direction,
             references: Sequence[Params] | None) -> _Prepared:
    """Checks the pair, runs the base and donor once (what the metric reads, and the residual
    streams candidates start from), keeping only the start model's stacked blocks."""
    config = base.config
    check_pair(base, donor)
    metric.check(config)
    start, target = endpoints(base, donor, direction, references)
    last_block = config.n_layers - 1 if metric.layer is None else metric.layer
    count = last_block + 2 if metric.layer is None else last_block + 1
    runs, start_stacked = {}, None
    order = (("donor", donor), ("base", base)) if start is base.params else (("base", base),
                                                                              ("donor", donor))
    for name, model in order:  # the start last: one stacked copy alive at a time
        stacked = stacked_checked(model.params, name)
        runs[name] = prefix_pass(config, stacked, without_layers(model.params), batch,
                                 metric.layer, count)
        if model.params is start:
            start_stacked = stacked
        del stacked
    if target is not base.params and target is not donor.params:  # an ablation target
        check_finite(target, "target")
    if start_stacked is None:  # pragma: no cover - the start is always the base or the donor
        start_stacked = stacked_checked(start, "start")
    if metric.outputs(config):  # read inside blocks: prefix_pass's readout does not serve
        runs = {name: (metric_readout(config, metric, model.params, batch), runs[name][1])
                for name, model in (("base", base), ("donor", donor))}
    state, base_score, donor_score = endpoint_scores(
        config, base, donor, batch, metric, (runs["base"][0], runs["donor"][0]))
    start_run = runs["base"] if start is base.params else runs["donor"]
    start_score = np.asarray(mean_score(metric, start_run[0], batch, state), np.float64)
    return _Prepared(start, target, start_stacked, start_run[1], start_run[0], state, base_score,
                     donor_score, start_score)


Operands = Callable[[int], Any]
"""A program's operands for its i-th group, made when the group runs."""


def _program(config: ModelConfig, metric: Metric, plan: ProgramPlan, prepared: _Prepared,
             batch: Batch, mesh: Mesh | None) -> tuple[tuple, Any, Operands]:
    """A plan's cache key, program function, and the maker of each group's operands (on a
    mesh: params split along `model`, prompts along `data`, the rest whole on every device)."""
    prompts = batch.tokens.shape[0]

    def on_mesh(params: Params, stacked: bool = False) -> Params:
        return params if mesh is None else place_params(mesh, params, stacked)

    def leaves(named: dict[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
        return named if mesh is None else place_leaves(mesh, named, prefix)

    def per_prompt(tree: Any) -> Any:
        return tree if mesh is None else place_prompts(mesh, tree, prompts)

    whole = (lambda x: x) if mesh is None else (lambda x: replicate(mesh, x))
    if plan.kind == "local":
        key = ("local", config, metric, plan.signature, plan.dense, mesh)
        fn = local_program(config, metric, plan.dense)
        stacked = on_mesh(prepared.start_stacked, stacked=True)
        rest = on_mesh(without_layers(prepared.start))
        shared = per_prompt((batch, prepared.state))

        def local(i: int) -> LocalOperands:
            layer = plan.groups[i][0].first_layer
            targets = leaves(leaves_named(prepared.target["layers"][layer], plan.signature),
                             f"layers.{layer}.")
            return LocalOperands(stacked, targets, rest, per_prompt(prepared.residuals[layer]),
                                 whole(jnp.int32(layer)), *shared)

        return key, fn, local
    key = ("general", config, metric, plan.start_layer, plan.signature, plan.dense, mesh)
    fn = general_program(config, metric, plan.start_layer, plan.dense)
    first_layer = plan.groups[0][0].first_layer
    residual = None if first_layer < 0 else prepared.residuals[plan.start_layer]
    earlier = prepared.start_readout if metric.outputs(config) else None
    start = on_mesh(prepared.start)
    targets = leaves(leaves_named(prepared.target, plan.signature), "")
    placed = per_prompt((residual, batch, prepared.state, earlier))

    def general(i: int) -> GeneralOperands:
        return GeneralOperands(start, targets, *placed)

    return key, fn, general


def sweep(
    base: Model,
    donor: Model,
    batch: Batch,
    metric: Metric,
    *,
    granularity: Granularity = "module",
    selector: SelectorLike | None = None,
    candidates: Sequence[Component] | Mapping[str, Patch] | None = None,
    direction: Direction = "denoise",
    references: Sequence[Params] | None = None,
    chunk_size: int | None = None,
    materialize: bool | None = None,
    memory_fraction: float = 0.3,
    progress: bool = True,
    positions: Positions = "last",
    inputs: Mapping[str, Any] | None = None,
    log: TaskLog | None = None,
    mesh: MeshLike | None = None,
) -> SweepResult:
    """Scores every candidate patch exactly.

    Arguments:
        base: the base model.
        donor: the behavior-specialized model (same architecture).
        batch: prompts and readout positions (`jaxpatch.make_batch`).
        metric: the behavioral interface (`VectorAnchor`, `LogitDiff`, `KLDivergence`, ...).
        granularity: module, head, neuron or layer (when `candidates` is None).
        selector: restrict to these components (default: all of the granularity).
        candidates: explicit components, or a mapping of names to custom `Patch`es.
        direction: "denoise" (donor weights into base), "noise" (base weights into donor),
            "zero" or "mean" (ablate the donor's components to zero or to the mean of
            `references`).
        references: params of reference models for mean ablation.
        chunk_size: candidates per batch (default: sized from free memory).
        materialize: build each candidate's patched weights (True), keep them factored
            (False), or choose by memory (None). The scores are the same either way.
        memory_fraction: share of free memory a chunk may use.
        progress: show a progress bar.
        positions: the readout positions `batch` was built with (recorded in the result).
        inputs: fingerprints to record in the result.
        log: record finished chunks here and replay the ones it holds (a resumable run; see
            `jaxpatch.io.runlog`). The scores are bitwise those of a run without it.
        mesh: split each chunk's candidates across devices (`jaxpatch.mesh`: a `Mesh`,
            `{"candidates": 4}` or `"candidates=4"`); chunks are rounded up to a multiple of
            the devices. None: one device.

    Returns:
        A `SweepResult` in candidate order.

    Raises:
        NonFiniteError: a weight or a score is NaN or infinite.
        MetricError: base and donor score the same.

    Example:
        >>> r = sweep(base, donor, batch, jaxpatch.VectorAnchor(layer=1), progress=False)
        >>> len(r.names), r.names[0]
        (21, 'embed_tokens')
    """
    if metric.width != 1:
        raise MetricError(f"the {metric.name} metric scores {metric.width} columns: use "
                          "sweep_matrix for it")
    if candidates is None:
        candidates = select(base.config, selector, granularity)
    wall_start = time.perf_counter()
    prepared, names, values, timing, skipped = _scores(
        base, donor, batch, metric, candidates, direction, references, chunk_size, materialize,
        memory_fraction, progress, wall_start, log, mesh)
    check_finite_scores(names, values, "score")
    return SweepResult(metric.name, direction, metric.layer, positions,
                       float(prepared.base_score), float(prepared.donor_score), names, values,
                       timing, dict(inputs or {}), skipped)


def sweep_matrix(
    base: Model,
    donor: Model,
    batch: Batch,
    metric: Metric,
    candidates: Sequence[Component] | Mapping[str, Patch],
    *,
    direction: Direction = "denoise",
    references: Sequence[Params] | None = None,
    chunk_size: int | None = None,
    materialize: bool | None = None,
    memory_fraction: float = 0.3,
    progress: bool = True,
    log: TaskLog | None = None,
    mesh: MeshLike | None = None,
) -> ScoreMatrix:
    """Scores every candidate patch exactly on every column of a metric: one run per
    candidate reads them all (e.g. every target of a `ComponentAnchor` with several targets).

    Arguments:
        base, donor, batch, metric: as for `sweep` (`metric` may have any width).
        candidates: components, or a mapping of names to custom `Patch`es (the rows).
        direction, references, chunk_size, materialize, memory_fraction, progress, log,
            mesh: as for `sweep`.

    Returns:
        A `ScoreMatrix`: rows in candidate order, one column per metric column.

    Example:
        >>> metric = jaxpatch.ComponentAnchor(("layers.0.mlp", "layers.1.self_attn"))
        >>> m = sweep_matrix(base, donor, batch, metric, jaxpatch.select(cfg, "layers.0", "module"),
        ...                  progress=False)
        >>> m.scores.shape, m.columns
        ((9, 2), ['layers.0.mlp', 'layers.1.self_attn'])
    """
    wall_start = time.perf_counter()
    prepared, names, values, timing, _ = _scores(
        base, donor, batch, metric, candidates, direction, references, chunk_size, materialize,
        memory_fraction, progress, wall_start, log, mesh)
    values = values.reshape(len(names), metric.width)
    check_finite_scores(names, values, "score")
    columns = list(metric.columns())
    return ScoreMatrix(metric.name, direction, "exact", names, columns,
                       np.asarray(prepared.base_score, np.float64).reshape(-1),
                       np.asarray(prepared.donor_score, np.float64).reshape(-1), values, timing)


def _scores(base: Model, donor: Model, batch: Batch, metric: Metric,
            candidates: Sequence[Component] | Mapping[str, Patch], direction: Direction,
            references: Sequence[Params] | None, chunk_size: int | None,
            materialize: bool | None, memory_fraction: float, progress: bool,
            wall_start: float, log: TaskLog | None, mesh_spec: MeshLike | None
            ) -> tuple[_Prepared, list[str], np.ndarray, dict[str, float], list[str]]:
    """prepare -> plan -> compile -> execute: the raw scores of every candidate (`[n]` or
    `[n, width]`), with the prepared endpoints, timing, and the names skipped."""
    config = base.config
    mesh = make_mesh(mesh_spec)  # a bad mesh is refused before any work
    base, donor, batch = placed_on(mesh, base, donor, batch)
    prepared = _prepare(base, donor, batch, metric, direction, references)
    cands = candidates_of(config, candidates)
    last_block = config.n_layers - 1 if metric.layer is None else metric.layer
    runs = [c.first_layer <= last_block or (metric.layer is None and c.first_layer == config.n_layers)
            for c in cands]
    run = [c for c, r in zip(cands, runs) if r]
    skipped = [c.name for c, r in zip(cands, runs) if not r]
    memory = _memory_plan(config, batch, memory_fraction, log, mesh)
    if log is not None and log.limit is not None:  # this run ran out of memory before
        chunk_size = min(chunk_size or memory["auto_chunk"], log.limit)
    plans = plan_programs(
        # a metric that reads inside blocks runs the plain forward (no block-local program)
        config, run, -1 if metric.outputs(config) else last_block,
        leaf_bytes={n: int(np.prod(a.shape)) * a.dtype.itemsize
                    for n, a in flatten_params(prepared.start).items()},
        chunk_size=chunk_size, auto_chunk=memory["auto_chunk"],
        materialize=materialize, budget=memory["budget"])
    split = candidate_devices(mesh)
    plans = [dataclasses.replace(p, chunk=-(-p.chunk // split) * split) for p in plans]
    programs = [(plan, *_program(config, metric, plan, prepared, batch, mesh)) for plan in plans]
    prepare_s = time.perf_counter() - wall_start

    compile_start = time.perf_counter()
    for plan, key, fn, operands in programs:
        specs = plan.alpha_specs(config)
        compiled(key, fn, specs if mesh is None else candidate_specs(mesh, specs), operands(0))
    compile_s = time.perf_counter() - compile_start

    resumed = 0 if log is None else log.recorded_candidates()
    scores = {name: prepared.start_score for name in skipped}
    scores.update(_execute(config, programs, direction, len(run), progress, log, resumed, mesh))
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


def _execute(config: ModelConfig, programs: Sequence[tuple[ProgramPlan, tuple, Any, Operands]],
             direction: str, total: int, progress: bool, log: TaskLog | None,
             resumed: int, mesh: Mesh | None) -> dict[str, np.ndarray]:
    """Runs every plan's candidates in padded chunks; their scores by name.

    Recorded chunks are replayed where a group's next candidates begin one; a chunk that runs
    out of device memory is retried at half the size, and the rest of the task keeps it."""
    from tqdm.auto import tqdm

    scores: dict[str, np.ndarray] = {}
    limit: int | None = None
    with tqdm(total=total, initial=min(resumed, total), unit="cand",
              desc=f"sweep {direction}" + (f" (resumed {resumed})" if resumed else ""),
              disable=not progress, dynamic_ncols=True) as bar:
        for plan, key, fn, operands in programs:
            for i, group in enumerate(plan.groups):
                names = [c.name for c in group]
                ops = None  # made when a chunk of the group must run (not when all replay)
                offset = 0
                while offset < len(group):
                    values = None if log is None else log.replay(names, offset)
                    if values is not None:
                        chunk = group[offset: offset + len(values)]
                    else:
                        if limit is not None and plan.chunk > limit:
                            plan = dataclasses.replace(plan, chunk=limit)
                            if mesh is not None and limit % candidate_devices(mesh):
                                raise JaxpatchError(
                                    f"out of device memory at {limit * 2} candidates per chunk, "
                                    f"and {limit} do not split across "
                                    f"{candidate_devices(mesh)} devices: pass a smaller "
                                    "--chunk-size that does")
                        chunk = group[offset: offset + plan.chunk]
                        ops = operands(i) if ops is None else ops
                        try:
                            values = _run_chunk(config, plan, key, fn, ops, chunk, mesh)
                        except Exception as error:  # only running out of memory is retried
                            if not is_out_of_memory(error):
                                raise
                            limit = _halved(plan.chunk, log)
                            continue
                        if log is not None:
                            log.record_chunk(names[offset: offset + len(chunk)], values)
                        bar.update(len(chunk))
                    scores.update({c.name: v for c, v in zip(chunk, values)})
                    offset += len(chunk)
    return scores


def _run_chunk(config: ModelConfig, plan: ProgramPlan, key: tuple, fn: Any, ops: Any,
               chunk: Sequence[Candidate], mesh: Mesh | None = None) -> np.ndarray:
    """One chunk's raw scores (`[len(chunk)]` or `[len(chunk), width]`), padding dropped; on
    a mesh, the chunk's candidates split across its devices."""
    rows = alpha_rows(config, plan, chunk)
    alphas = ({n: jnp.asarray(a) for n, a in rows.items()} if mesh is None
              else shard_candidates(mesh, rows))
    return to_host(compiled(key, fn, alphas, ops)(alphas, ops))[: len(chunk)]


def _halved(chunk: int, log: TaskLog | None) -> int:
    """The chunk size after running out of memory at `chunk` (said once per halving)."""
    if chunk <= 1:
        raise JaxpatchError("out of device memory with one candidate per chunk: use fewer or "
                            "shorter prompts, a lower --dtype, or a device with more memory")
    smaller = chunk // 2
    _LOG.warning("jaxpatch: out of device memory at %d candidates per chunk; continuing with %d",
                 chunk, smaller)
    if log is not None:
        log.record_limit(smaller)
    return smaller
