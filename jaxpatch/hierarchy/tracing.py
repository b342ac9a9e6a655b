"""Supplier -> target tracing on one prepared pair: the behavior runs, the validated source set,
the tracing levels and the execution sweep, each run counted (see `jaxpatch.hierarchy`)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Mapping, Sequence

import numpy as np

from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.engine import (
    PreparedPair,
    activation_matrix,
    activation_patching,
    sweep,
    sweep_matrix,
)
from jaxpatch.errors import InvalidInputError, MetricError
from jaxpatch.hierarchy.roles import (
    SOURCES_ROW,
    Edge,
    Hierarchy,
    Thresholds,
    group_of,
    role_of,
)
from jaxpatch.metrics import (
    ComponentAnchor,
    KLDivergence,
    LogProb,
    Metric,
    metric_endpoints,
    target_sites,
)
from jaxpatch.modes import SCORED_GRANULARITIES, ScoredGranularity, check_mode
from jaxpatch.patch import Patch
from jaxpatch.results import ScoreMatrix, SweepResult
from jaxpatch.runs.settings import Execution, execution_of

__all__ = ["TraceSearch", "Behavior", "trace_hierarchy"]


def _better(denoise: SweepResult, noise: SweepResult) -> np.ndarray:
    """Each component's effect in its better direction."""
    return np.maximum(denoise.recovery, 1.0 - noise.recovery)


def _patches(config: Any, sets: Mapping[str, Sequence[Component]]) -> dict[str, Patch]:
    return {name: Patch.from_components(config, items, label=name) for name, items in sets.items()}


class _Runner:
    """Runs the sweeps of one trace on one prepared pair, counting them and their candidate
    runs; with a log, each run records into a part of it named by its place in the trace (the
    trace's runs follow from its inputs, so a resumed trace asks for the same runs in the same
    order)."""

    def __init__(self, pair: PreparedPair, execution: Execution) -> None:
        self.pair, self.execution, self.runs = pair, execution, 0
        self.calls = {"sweeps": 0, "validation_sweeps": 0, "tracing_sweeps": 0,
                      "activation_runs": 0, "candidate_runs": 0}

    def _next(self) -> Execution:
        self.runs += 1
        return self.execution.sub(f"run{self.runs:04d}")

    def sweep(self, metric: Metric, candidates: Any, direction: str = "denoise",
              kind: str = "sweeps") -> SweepResult:
        self.calls[kind] += 1
        self.calls["candidate_runs"] += len(candidates)
        return sweep(self.pair, metric, candidates=candidates, direction=direction,  # type: ignore[arg-type]
                     execution=self._next())

    def activation(self, metric: Metric, granularity: ScoredGranularity,
                   selector: SelectorLike | None, direction: str) -> SweepResult:
        result = activation_patching(self.pair, metric, granularity=granularity, selector=selector,
                                     direction=direction,  # type: ignore[arg-type]
                                     execution=self._next())
        self.calls["activation_runs"] += 1
        self.calls["candidate_runs"] += len(result.names)
        return result

    def matrices(self, metric: ComponentAnchor, patches: dict[str, Patch],
                 items: Sequence[Component]) -> tuple[ScoreMatrix, ScoreMatrix]:
        self.calls["tracing_sweeps"] += 1
        self.calls["activation_runs"] += 1
        self.calls["candidate_runs"] += len(patches) + len(items)
        weights = sweep_matrix(self.pair, metric, patches, execution=self._next())
        activations = activation_matrix(self.pair, metric, items, execution=self._next())
        return weights, activations


def _validated_sources(runner: _Runner, metric: Metric, items: Sequence[Component],
                       weight: np.ndarray, thresholds: Thresholds,
                       max_groups: int) -> tuple[dict[str, float], dict[str, float], float, list[str]]:
    """The validated source set: each member's gain, the gains of the components left out of
    the chosen groups for adding too little, the set's recovery, the chosen groups."""
    config = runner.pair.config
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(items):
        groups.setdefault(group_of(c), []).append(i)
    strength = {g: float(max(weight[i] for i in members)) for g, members in groups.items()}
    candidates = sorted((g for g in groups if strength[g] >= thresholds.candidate),
                        key=lambda g: -strength[g])[:max_groups]
    if not candidates:
        return {}, {}, 0.0, []
    subsets = [s for k in range(1, len(candidates) + 1)
               for s in itertools.combinations(candidates, k)]
    result = runner.sweep(metric, _patches(config, {
        " + ".join(s): [items[i] for g in s for i in groups[g]] for s in subsets}),
        kind="validation_sweeps")
    net = result.recovery - thresholds.min_gain * np.array([len(s) for s in subsets])
    chosen = subsets[int(np.argmax(net))]
    members = [i for g in chosen for i in groups[g]]
    dropped: dict[str, float] = {}
    while True:
        rest = {items[i].name: [items[j] for j in members if j != i] for i in members}
        whole = runner.sweep(metric, _patches(config, {"set": [items[i] for i in members]}),
                             kind="validation_sweeps").recovery[0]
        if len(members) == 1:
            gains = {items[members[0]].name: float(whole)}
            break
        without = runner.sweep(metric, _patches(config, rest), kind="validation_sweeps").recovery
        gains = {name: float(whole - r) for name, r in zip(rest, without)}
        kept = [i for i in members if gains[items[i].name] >= thresholds.min_gain]
        if len(kept) == len(members) or not kept:  # none kept: they stand in for each other
            break
        dropped.update({items[i].name: gains[items[i].name] for i in members if i not in kept})
        members = kept
    return ({items[i].name: gains[items[i].name] for i in members}, dropped, float(whole),
            list(chosen))


def _changed_outputs(pair: PreparedPair, targets: Sequence[str]) -> list[str]:
    """The targets whose output differs between base and donor (others have no anchor)."""
    if not targets:
        return []
    config, batch = pair.config, pair.batch
    probe = ComponentAnchor(tuple(targets))
    x_base, x_donor = metric_endpoints(config, probe, pair.base.params, pair.donor.params, batch)
    weights = np.asarray(batch.weights)[..., None]
    kept = []
    for t in targets:
        b, d = np.asarray(x_base[t], np.float64), np.asarray(x_donor[t], np.float64)
        v = ((d - b) * weights).sum(axis=1).mean(axis=0)
        scale = max(float(np.abs(b).max()), 1e-12)
        if np.linalg.norm(v) > 1e-6 * scale:
            kept.append(t)
    return kept


@dataclasses.dataclass(frozen=True)
class TraceSearch:
    """How far the hierarchy's searches go.

    Attributes:
        targets: the first level's targets (component anchor targets, e.g.
            `layers.2.self_attn`); default: the components with a high activation score and
            the sources.
        depth: expansion levels of supplier -> target tracing.
        top_targets: at most this many targets per level.
        max_groups: at most this many candidate groups in the source search (all their
            subsets are scored).

    Example:
        >>> TraceSearch(depth=1).top_targets
        24
    """

    targets: tuple[str, ...] | None = None
    depth: int = 2
    top_targets: int = 24
    max_groups: int = 12


@dataclasses.dataclass(frozen=True)
class Behavior:
    """The behavior step's four runs, when the caller has made them already (a study that
    scored the same components on the same pair and metric): `trace_hierarchy` uses them
    instead of running them again.

    Attributes:
        weights_denoise, weights_noise: exact weight sweeps (`sweep`), both directions.
        activation_denoise, activation_noise: activation patching, both directions.
    """

    weights_denoise: SweepResult
    weights_noise: SweepResult
    activation_denoise: SweepResult
    activation_noise: SweepResult


def trace_hierarchy(
    pair: PreparedPair,
    metric: Metric,
    *,
    output_metric: Metric | None = None,
    granularity: ScoredGranularity = "module",
    selector: SelectorLike | None = None,
    formation_layer: int | None = None,
    thresholds: Thresholds | None = None,
    search: TraceSearch = TraceSearch(),
    behavior: Behavior | None = None,
    execution: Execution | None = None,
) -> Hierarchy:
    """Sorts every component into source, aggregation, execution or inert, and traces which
    suppliers' weights recover which targets' outputs.

    Arguments:
        pair: the base/donor pair and prompts (`jaxpatch.prepare`): prepared once, every
            sweep of the trace reuses its prefix passes and metric endpoints.
        metric: the behavior (e.g. `LogProb` of the answers, a `VectorAnchor`).
        output_metric: what execution is measured on (default: `LogProb` when every prompt
            has a target, else `KLDivergence`).
        granularity: module, head or neuron.
        selector: restrict to these components (what is scored, searched and traced).
        formation_layer: the block after which the signal counts as formed (aggregation at or
            before it, execution after it; default: the metric's readout block, or the last
            block for metrics read at the logits).
        thresholds: the role thresholds (`Thresholds`; default: its defaults).
        search: targets, depth and breadth of the searches (`TraceSearch`).
        behavior: the behavior step's runs when the caller has them (`Behavior`).
        execution: progress bars, chunks and the log of a resumable run (every sweep's and
            activation run's chunks), as for `sweep`.

    Returns:
        A `Hierarchy`.

    Raises:
        InvalidInputError: depth or top_targets below 1, or a formation layer out of range.
        SelectorError: the selector or a target names nothing in this model.
        MetricError: a given target's output does not differ between base and donor.

    Example:
        On the hand-built chain (`jaxpatch.examples.chain_pair`), formed after the router:

        >>> from jaxpatch.examples import chain_pair
        >>> chain = chain_pair()
        >>> h = trace_hierarchy(jaxpatch.prepare(chain.base, chain.donor, chain.batch),
        ...                     jaxpatch.LogProb(), formation_layer=1)
        >>> h.with_role("source"), h.role("layers.1.self_attn.o_proj"), h.role("layers.2.mlp.down_proj")
        (['layers.0.mlp.down_proj'], 'aggregation', 'execution')
    """
    started = time.perf_counter()
    thresholds = Thresholds() if thresholds is None else thresholds
    config, batch = pair.config, pair.batch
    check_mode("granularity", granularity, SCORED_GRANULARITIES, InvalidInputError)
    if metric.width != 1:
        raise MetricError(f"trace the behavior with a one-column metric, not {metric.name} "
                          f"with {metric.width}")
    if search.depth < 1 or search.top_targets < 1 or search.max_groups < 1:
        raise InvalidInputError("depth, top_targets and max_groups must be at least 1")
    last = config.n_layers - 1
    formed = (metric.layer if metric.layer is not None else last) if formation_layer is None \
        else formation_layer
    if not 0 <= formed <= last:
        raise InvalidInputError(f"formation layer {formed} is out of range: the model has blocks "
                                f"0..{last}")
    if output_metric is None:
        has_targets = bool((np.asarray(batch.targets)[:, 0] >= 0).all())
        output_metric = LogProb() if has_targets else KLDivergence()
    runner = _Runner(pair, execution_of(execution))
    items = select(config, selector, granularity)
    if search.targets is not None:
        for target in search.targets:
            target_sites(config, target)
        unchanged = set(search.targets) - set(_changed_outputs(pair, search.targets))
        if unchanged:
            raise MetricError(f"the output of {sorted(unchanged)[0]} does not differ between base "
                              "and donor on these prompts: it cannot be a target")
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    names = [c.name for c in items]
    if behavior is not None:
        _check_behavior(behavior, metric, names)
    runs = behavior or Behavior(
        runner.sweep(metric, items, "denoise"), runner.sweep(metric, items, "noise"),
        runner.activation(metric, granularity, selector, "denoise"),
        runner.activation(metric, granularity, selector, "noise"))
    weight = _better(runs.weights_denoise, runs.weights_noise)
    activation = _better(runs.activation_denoise, runs.activation_noise)
    if behavior is not None:
        runner.runs += 4  # the sub-runs of a log keep their places
    timing["behavior_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gains, dropped, sources_recovery, groups = _validated_sources(runner, metric, items, weight,
                                                                  thresholds, search.max_groups)
    timing["validation_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    supplied, edges, matrices = _trace(runner, items, names, activation, gains, thresholds,
                                       search.depth, search.top_targets, search.targets)
    timing["tracing_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    after = [c for c in items if c.layer > formed]
    execution_drops: dict[str, float] = {}
    if after:
        ablated = runner.sweep(output_metric, after, "zero")
        execution_drops = {c.name: float(e) for c, e in zip(after, ablated.effect)}
    timing["execution_s"] = time.perf_counter() - t0

    rows = [role_of(c, float(weight[i]), float(activation[i]), gains, dropped.get(c.name),
                  supplied.get(c.name), execution_drops.get(c.name), formed, thresholds, edges)
            for i, c in enumerate(items)]
    timing["wall_s"] = time.perf_counter() - started
    settings = {"metric": metric.name, "output_metric": output_metric.name,
                "granularity": granularity, "depth": search.depth,
                "top_targets": search.top_targets, "max_groups": search.max_groups,
                "source_groups": groups, "thresholds": dataclasses.asdict(thresholds)}
    return Hierarchy(rows=rows, edges=edges, matrices=matrices, sources_recovery=sources_recovery,
                     formation_layer=formed, settings=settings, calls=runner.calls, timing=timing)


def _check_behavior(behavior: Behavior, metric: Metric, names: list[str]) -> None:
    """Refuses given behavior runs that are not of these components and this metric."""
    for field in dataclasses.fields(behavior):
        result: SweepResult = getattr(behavior, field.name)
        if result.names != names or result.metric != metric.name:
            raise InvalidInputError(
                f"the given {field.name.replace('_', ' ')} run scores {len(result.names)} "
                f"components on {result.metric}, not the {len(names)} traced on {metric.name}")


def _trace(runner: _Runner, items: Sequence[Component], names: list[str], activation: np.ndarray,
           gains: dict[str, float], thresholds: Thresholds, depth: int, top_targets: int,
           given: Sequence[str] | None) -> tuple[dict[str, float], list[Edge], dict[str, ScoreMatrix]]:
    """Supplier -> target tracing, level by level: each level one weight sweep and one
    activation run over every upstream supplier, reading every target at once."""
    config = runner.pair.config
    by_name = dict(zip(names, items))
    order = np.argsort(-activation, kind="stable")
    first = [names[i] for i in order if activation[i] >= thresholds.activation][:top_targets]
    targets = list(dict.fromkeys(first + [n for n in names if n in gains])) if given is None \
        else list(dict.fromkeys(given))
    supplied: dict[str, float] = {}
    edges: list[Edge] = []
    matrices: dict[str, ScoreMatrix] = {}
    traced: set[str] = set()
    for level in range(1, depth + 1):
        targets = _changed_outputs(runner.pair, [t for t in targets if t not in traced])
        if not targets:
            break
        traced.update(targets)
        reach = max(_target_layer(config, t) for t in targets)
        suppliers = [c for c in items if c.layer <= reach]
        patches = _patches(config, {c.name: [c] for c in suppliers})
        for name, members in _joint_rows(gains, targets).items():
            patches[name] = Patch.from_components(config, [by_name[n] for n in members], label=name)
        weights, activations = runner.matrices(ComponentAnchor(tuple(targets)), patches, suppliers)
        matrices[f"level{level}/weights"], matrices[f"level{level}/activations"] = weights, activations
        w, a = weights.recovery, activations.recovery
        row = {name: k for k, name in enumerate(weights.names)}
        next_targets: dict[str, float] = {}
        for j, target in enumerate(targets):
            joint = _joint_name(gains, target)
            others = [(name, float(w[row[name], j])) for name in weights.names
                      if name != target and (name == joint or not name.startswith(SOURCES_ROW))]
            supplied[target] = max((score for _, score in others), default=0.0)
            for name, score in others:
                single = not name.startswith(SOURCES_ROW)
                act = float(a[activations.names.index(name), j]) if single else None
                if max(score, act or 0.0) < thresholds.edge:
                    continue
                edges.append(Edge(SOURCES_ROW if not single else name, target, score, act, level))
                if single and score >= thresholds.edge:
                    next_targets[name] = max(next_targets.get(name, 0.0), score)
        targets = sorted(next_targets, key=lambda n: -next_targets[n])[:top_targets]
    return supplied, edges, matrices


def _target_layer(config: Any, target: str) -> int:
    """The last block a target's output depends on (n_layers for the final modules)."""
    layer = ComponentAnchor(target).layer
    return config.n_layers if layer is None else layer


def _joint_name(gains: dict[str, float], target: str) -> str | None:
    """The row patching every source together, minus the target itself when it is one (None
    when that leaves fewer than two: a single source is a row of its own)."""
    if len([n for n in gains if n != target]) < 2:
        return None
    return f"{SOURCES_ROW} but {target}" if target in gains else SOURCES_ROW


def _joint_rows(gains: dict[str, float], targets: Sequence[str]) -> dict[str, list[str]]:
    """The joint-source rows a level needs: all sources, and all sources but each target
    that is a source (a component does not supply itself)."""
    rows: dict[str, list[str]] = {}
    for target in targets:
        name = _joint_name(gains, target)
        if name is not None:
            rows[name] = [n for n in gains if n != target]
    return rows


