"""Exhaustive, exact patch sweeps.

`sweep` scores every candidate patch with the same numbers as patching it alone and running
the plain forward, but never computes what a candidate does not change:

- the start model's residual stream is computed once; a candidate whose first patched block is
  i starts from the cached residual before block i;
- candidates are grouped by their first patched block; a group's candidates are a leading axis
  on their alpha coefficients (`jax.vmap`), so the rest of the network runs once on their
  activations stacked into the batch axis, with the shared weights;
- the patched leaves are `MixedWeight(start, delta, alpha)`: a matmul never builds a patched
  weight per candidate (for small groups the patched block's weights are built per candidate
  when that is cheaper and fits a small memory budget);
- a metric reading block L stops there, computing block L only at the readout positions;
  candidates after L are reported as exactly unchanged without running;
- chunks of a group are padded to one size so each group compiles once.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.errors import JaxpatchError
from jaxpatch.metrics import Metric, MetricError, mean_score, readout
from jaxpatch.models.config import ModelConfig, Params, flatten_params
from jaxpatch.models.decoder import (MixedWeight, attention_allowed, block, embed, forward,
                                     layer_at, rope_tables, run_blocks, stack_layers, unembed,
                                     window_at)
from jaxpatch.models.model import Model
from jaxpatch.patch import Patch, ablation_target, alpha_shapes, check_compatible, component_entries
from jaxpatch.prompts import Batch

DIRECTIONS: tuple[str, ...] = ("denoise", "noise", "zero", "mean")
_MATERIALIZE_BYTES = 256 * 1024**2


class NonFiniteError(JaxpatchError):
    """A weight or a score is NaN or infinite."""


# ------------------------------------------------------------------------------------ results

@dataclasses.dataclass
class SweepResult:
    """The scores of a sweep, in candidate order.

    Attributes:
        metric, direction, anchor_layer, positions: what was measured and how.
        base_score, donor_score: the unpatched models' scores (recovery 0 and 1).
        names: candidate names.
        scores: raw metric scores of the patched models.
        timing: wall_s (all), prepare_s (base/donor runs, anchor, caches), compile_s,
            sweep_s (the candidates, compilation excluded) and candidates_per_s over sweep_s.
        inputs: checkpoint and prompts fingerprints, versions, seeds.
        skipped: names of candidates after the anchor layer, reported without running.
        method: "exact" for sweeps; the attribution method for attribution tables.
        extra: method-specific details (e.g. integrated gradients' completeness gap).

    Example:
        >>> r = SweepResult("anchor", "denoise", 1, "last", 0.0, 2.0, ["a"], np.array([1.0]))
        >>> r.recovery.tolist()
        [0.5]
    """

    metric: str
    direction: str
    anchor_layer: int | None
    positions: str
    base_score: float
    donor_score: float
    names: list[str]
    scores: np.ndarray
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)
    method: str = "exact"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def recovery(self) -> np.ndarray:
        """`(score - base) / (donor - base)`: 0 at the base model, 1 at the donor."""
        return (self.scores - self.base_score) / (self.donor_score - self.base_score)

    @property
    def effect(self) -> np.ndarray:
        """How far the patch moved the score from the model it was applied to, in recovery
        units: `recovery` when denoising, `1 - recovery` otherwise (0 = no effect)."""
        return self.recovery if self.direction == "denoise" else 1.0 - self.recovery

    def to_dict(self) -> dict[str, Any]:
        """The result as the `scores.json` document.

        Example:
            >>> SweepResult("kl", "noise", None, "last", 1.0, 0.0, [], np.zeros(0)).to_dict()["metric"]
            'kl'
        """
        return {
            "metric": self.metric, "direction": self.direction, "anchor_layer": self.anchor_layer,
            "positions": self.positions, "base_score": self.base_score,
            "donor_score": self.donor_score,
            "components": [{"name": n, "score": float(s), "recovery": float(r), "effect": float(e)}
                           for n, s, r, e in zip(self.names, self.scores, self.recovery, self.effect)],
            "skipped": self.skipped, "method": self.method, "extra": self.extra,
            "timing": self.timing, "inputs": self.inputs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepResult":
        """Rebuilds a result from `to_dict` output."""
        comps = data["components"]
        return cls(data["metric"], data["direction"], data["anchor_layer"], data["positions"],
                   data["base_score"], data["donor_score"], [c["name"] for c in comps],
                   np.array([c["score"] for c in comps], np.float64), dict(data.get("timing", {})),
                   dict(data.get("inputs", {})), list(data.get("skipped", [])),
                   data.get("method", "exact"), dict(data.get("extra", {})))

    def to_csv(self) -> str:
        """The scores as CSV (`name,score,recovery,effect`)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "score", "recovery", "effect"])
        for n, s, r, e in zip(self.names, self.scores, self.recovery, self.effect):
            writer.writerow([n, f"{s:.9g}", f"{r:.9g}", f"{e:.9g}"])
        return out.getvalue()

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The k candidates with the largest effect, as (name, effect).

        Example:
            >>> r = SweepResult("m", "denoise", None, "last", 0.0, 1.0, ["a", "b"], np.array([0.2, 0.9]))
            >>> r.top(1)
            [('b', 0.9)]
        """
        order = np.argsort(-self.effect, kind="stable")[:k]
        return [(self.names[i], float(self.effect[i])) for i in order]


# --------------------------------------------------------------------------------- candidates

@dataclasses.dataclass(frozen=True)
class _Candidate:
    name: str
    first_layer: int
    leaves: tuple[str, ...]
    component: Component | None = None
    patch: Patch | None = None


def _leaf_layer(config: ModelConfig, name: str) -> int:
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return -1 if name.startswith("embed") else config.n_layers


def _candidates(config: ModelConfig, items: Sequence[Component] | Mapping[str, Patch]) -> list[_Candidate]:
    out = []
    if isinstance(items, Mapping):
        for name, patch in items.items():
            flat = flatten_params(patch.alpha)
            leaves = tuple(n for n, a in flat.items() if np.any(np.asarray(a) != 0))
            if not leaves:
                raise JaxpatchError(f"candidate patch {name!r} patches nothing (all coefficients 0)")
            out.append(_Candidate(name, min(_leaf_layer(config, n) for n in leaves), leaves,
                                  patch=patch))
        return out
    for c in items:
        leaves = tuple(component_entries(config, c))
        out.append(_Candidate(c.name, c.layer, leaves, component=c))
    return out


def _alpha_rows(config: ModelConfig, group: Sequence[_Candidate],
                specs: Mapping[str, jax.ShapeDtypeStruct],
                prefix: Callable[[_Candidate], str] = lambda c: "") -> dict[str, np.ndarray]:
    """The alpha coefficients of a chunk of candidates, stacked as `specs` shapes them (zero
    rows pad the chunk). Names in `specs` are leaf names with `prefix(candidate)` removed."""
    rows = {name: np.zeros(spec.shape, np.float32) for name, spec in specs.items()}
    for i, cand in enumerate(group):
        strip = len(prefix(cand))
        if cand.component is not None:
            for name, index in component_entries(config, cand.component).items():
                rows[name[strip:]][(i, *index)] = 1.0
        else:
            flat = flatten_params(cand.patch.alpha)  # type: ignore[union-attr]
            for name in cand.leaves:
                rows[name[strip:]][i] = np.asarray(flat[name])
    return rows


# --------------------------------------------------------------------------- compiled chunks

_COMPILED: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_COMPILED_MAX = 64  # compiled sweep programs kept, least recently used dropped first


def _replace_leaves(params: Params, replacements: Mapping[str, Any]) -> Params:
    flat, treedef = jax.tree_util.tree_flatten(params)
    names = list(flatten_params(params))
    return jax.tree_util.tree_unflatten(treedef, [replacements.get(n, leaf) for n, leaf in zip(names, flat)])


def _patched(leaves: Mapping[str, jax.Array], deltas: Mapping[str, jax.Array],
             alpha: Mapping[str, jax.Array], materialize: bool) -> dict[str, Any]:
    """Signature leaves as `MixedWeight`s (or their materialized values)."""
    mixed = {n: MixedWeight(leaves[n], deltas[n], alpha[n]) for n in alpha}
    return {n: m.value() for n, m in mixed.items()} if materialize else mixed


def _rope(config: ModelConfig, batch: Batch, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array] | None:
    return rope_tables(config, batch.tokens.shape[1], dtype) if config.positional == "rope" else None


def _local_chunk_function(config: ModelConfig, metric: Metric, stop: int | None,
                          materialize: bool) -> Callable[..., jax.Array]:
    """Scores of a chunk of candidates that all patch one block, whose index is traced: one
    compiled program serves every block. Patched block, then a loop over the following blocks
    with the shared stacked weights, then the readout block at the readout positions."""
    last = config.n_layers - 1 if stop is None else stop

    def run(stacked: Params, deltas: dict[str, jax.Array], rest: Params, alphas: dict[str, jax.Array],
            residual: jax.Array, index: jax.Array, batch: Batch, state: Any) -> jax.Array:
        rope = _rope(config, batch, residual.dtype)
        layer = layer_at(stacked, index)
        flat = flatten_params(layer)
        layer_deltas = {n: jax.lax.dynamic_index_in_dim(d, index, keepdims=False)
                        for n, d in deltas.items()}
        allowed = attention_allowed(batch.mask, window_at(config, index))

        def one(alpha: dict[str, jax.Array]) -> jax.Array:
            patched = _replace_leaves(layer, _patched(flat, layer_deltas, alpha, materialize))

            def patched_is_readout(x: jax.Array) -> jax.Array:
                return block(config, patched, x, allowed, rope, batch.positions)[0]

            def patched_then_rest(x: jax.Array) -> jax.Array:
                x = block(config, patched, x, allowed, rope)[0]
                x = run_blocks(config, stacked, x, batch.mask, rope, index + 1, last)
                readout_allowed = attention_allowed(batch.mask, window_at(config, last))
                return block(config, layer_at(stacked, last), x, readout_allowed, rope,
                             batch.positions)[0]

            x = jax.lax.cond(index == last, patched_is_readout, patched_then_rest, residual)
            if stop is None:
                x = unembed(config, rest, x)
            return jnp.mean(metric.score(x, batch, state))

        return jax.vmap(one)(alphas)

    return run


def _general_chunk_function(config: ModelConfig, metric: Metric, start_layer: int,
                            stop_layer: int | None, materialize: bool) -> Callable[..., jax.Array]:
    """Scores of a chunk of candidates that may patch several blocks, the embeddings or the
    final modules: the plain forward from `start_layer` with the signature leaves mixed."""

    def run(start: Params, deltas: dict[str, jax.Array], alphas: dict[str, jax.Array],
            residual: jax.Array | None, batch: Batch, state: Any) -> jax.Array:
        flat = flatten_params(start)

        def one(alpha: dict[str, jax.Array]) -> jax.Array:
            params = _replace_leaves(start, _patched(flat, deltas, alpha, materialize))
            out = forward(config, params, batch.tokens, batch.mask, start_layer=start_layer,
                          residual=residual, stop_layer=stop_layer,
                          readout_positions=batch.positions)
            x = out.residual if stop_layer is not None else out.logits
            return jnp.mean(metric.score(x, batch, state))

        return jax.vmap(one)(alphas)

    return run


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A group of candidates, the compiled function that scores them, and its arguments.

    `args` holds the arguments with `None` in the alpha slot (`alpha_slot`); `alpha_specs`
    are the alpha rows' shapes, for compiling before any chunk is built.
    """

    groups: list[list[_Candidate]]
    prefix: Callable[[_Candidate], str]
    size: int
    args: list[tuple]
    alpha_slot: int
    key: tuple
    fn: Callable[..., Any]
    alpha_specs: dict[str, jax.ShapeDtypeStruct]

    def with_alphas(self, args: tuple, alphas: Any) -> tuple:
        return args[: self.alpha_slot] + (alphas,) + args[self.alpha_slot + 1:]


def _compile_all(plans: Sequence[_Plan]) -> float:
    """Compiles every plan's function once; returns the time spent."""
    start = time.perf_counter()
    for plan in plans:
        _compiled(plan.key, plan.fn, plan.with_alphas(plan.args[0], plan.alpha_specs))
    return time.perf_counter() - start


def _compiled(key: Any, fn: Callable[..., Any], args: tuple) -> Any:
    shapes = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), args)
    full_key = (key, jax.tree_util.tree_structure(args), tuple(jax.tree_util.tree_leaves(shapes)))
    if full_key not in _COMPILED:
        _COMPILED[full_key] = jax.jit(fn).lower(*args).compile()
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(full_key)
    return _COMPILED[full_key]


# ------------------------------------------------------------------------------------ memory

def available_memory_bytes() -> int:
    """Free memory on the default device (host memory on CPU).

    Example:
        >>> available_memory_bytes() > 0
        True
    """
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # pragma: no cover
        return 4 * 1024**3


def _per_candidate_bytes(config: ModelConfig, batch: Batch) -> int:
    p, s = batch.tokens.shape
    item = jnp.dtype(config.dtype).itemsize
    per_token = 4 * config.d_model + 3 * config.d_ff + 2 * config.n_heads * s
    return int(p * s * per_token * max(item, 4) * 2)


# --------------------------------------------------------------------------------------- sweep

@jax.jit
def _stack_and_check(params: Params) -> tuple[Params, Params]:
    """The blocks stacked (`stack_layers`), and per leaf whether it is all finite."""
    finite = jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)
    return stack_layers(params["layers"]), finite


def _stacked_checked(params: Params, which: str) -> Params:
    """Stacks a model's blocks, refusing NaN or Inf in any of its tensors."""
    stacked, finite = _stack_and_check(params)
    for name, ok in flatten_params(finite).items():
        if not bool(ok):
            raise NonFiniteError(f"{which} tensor {name!r} holds NaN or Inf")
    return stacked


@functools.partial(jax.jit, static_argnums=2)
def _deltas(target: Mapping[str, jax.Array], start: Mapping[str, jax.Array],
            names: tuple[str, ...]) -> dict[str, jax.Array]:
    return {n: target[n] - start[n] for n in names}


def _stacked_deltas(target: Params, start: Params, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """`target - start` for the named leaves of stacked blocks (names relative to a block)."""
    return _deltas(flatten_params(target), flatten_params(start), names)


def _without_layers(params: Params) -> Params:
    return {k: v for k, v in params.items() if k != "layers"}


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _run_stacked(config: ModelConfig, stacked: Params, rest: Params, batch: Batch,
                 layer: int | None, count: int) -> tuple[jax.Array, jax.Array]:
    """One pass over stacked blocks (one compiled block whatever the depth) giving what a
    metric reading after `layer` reads (`metrics.readout`) and the residual stream before
    blocks 0 .. count - 1, `[count, P, S, d_model]` (an entry at n_layers, when asked for, is
    the stream after the last block)."""
    x = embed(config, rest, batch.tokens)
    rope = _rope(config, batch, x.dtype)
    last = config.n_layers - 1 if layer is None else layer

    def step(h: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        allowed = attention_allowed(batch.mask, window_at(config, i))
        return block(config, layer_at(stacked, i), h, allowed, rope)[0], h

    h, before = jax.lax.scan(step, x, jnp.arange(last))
    before = jnp.concatenate([before, h[None]])  # before blocks 0 .. last
    allowed = attention_allowed(batch.mask, window_at(config, last))
    if count > last + 1:  # the final modules need the stream after block `last` everywhere
        after = block(config, layer_at(stacked, last), h, allowed, rope)[0]
        before = jnp.concatenate([before, after[None]])
        readout_x = jnp.take_along_axis(after, batch.positions[..., None], axis=1)
    else:
        readout_x = block(config, layer_at(stacked, last), h, allowed, rope, batch.positions)[0]
    return (readout_x if layer is not None else unembed(config, rest, readout_x)), before[:count]


def endpoint_scores(config: ModelConfig, base: Model, donor: Model, batch: Batch, metric: Metric,
                    readouts: tuple[jax.Array, jax.Array]) -> tuple[Any, float, float]:
    """Prepares a metric and scores the base and donor (recovery 0 and 1).

    Arguments:
        readouts: the base's and donor's readouts (`metrics.readout`).

    Returns:
        `(state, base_score, donor_score)`.

    Raises:
        NonFiniteError: a score is NaN or infinite.
        MetricError: base and donor score the same, so recovery is undefined.

    Example:
        >>> # state, base_score, donor_score = endpoint_scores(cfg, base, donor, batch, metric, xs)
    """
    state = metric.prepare(config, base.params, donor.params, batch, readouts)
    base_score, donor_score = (float(mean_score(metric, x, batch, state)) for x in readouts)
    if not math.isfinite(base_score) or not math.isfinite(donor_score):
        raise NonFiniteError(f"the {metric.name} score is not finite (base {base_score}, donor "
                             f"{donor_score})")
    if base_score == donor_score:
        raise MetricError(f"base and donor have the same {metric.name} score ({base_score}): "
                          "recovery is undefined on these prompts")
    return state, base_score, donor_score


def check_pair(base: Model, donor: Model) -> None:
    """Refuses a base/donor pair that is not the same architecture.

    Raises:
        PatchError: naming the first tensor that differs, with both shapes.
        JaxpatchError: naming the first config setting that differs.

    Example:
        >>> # check_pair(jaxpatch.load(BASE), jaxpatch.load(DONOR))
    """
    check_compatible(base.params, donor.params)
    for field in dataclasses.fields(ModelConfig):
        if field.name in ("metadata", "dtype"):
            continue
        a, b = getattr(base.config, field.name), getattr(donor.config, field.name)
        if a != b:
            raise JaxpatchError(f"base and donor differ in {field.name} ({a!r} vs {b!r}): "
                                "weight patching needs one architecture")


def _endpoints(base: Model, donor: Model, direction: str,
               references: Sequence[Params] | None) -> tuple[Params, Params]:
    """(start, target) params of a direction, target cast to the start's dtypes."""
    if direction == "denoise":
        start, target = base.params, donor.params
    elif direction == "noise":
        start, target = donor.params, base.params
    elif direction in ("zero", "mean"):
        start = donor.params
        target = ablation_target(donor.params, direction, references)
    else:
        raise JaxpatchError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    target = jax.tree_util.tree_map(lambda t, s: t.astype(s.dtype), target, start)
    return start, target


def _is_block_local(candidate: _Candidate, last_block: int) -> bool:
    prefix = f"layers.{candidate.first_layer}."
    return 0 <= candidate.first_layer <= last_block and all(n.startswith(prefix)
                                                            for n in candidate.leaves)


def _chunk_size(requested: int | None, auto: int, largest_group: int) -> int:
    return max(1, min(requested or auto, largest_group))


def _use_dense(materialize: bool | None, size: int, signature_bytes: int, budget: int) -> bool:
    if materialize is not None:
        return materialize
    return size * signature_bytes <= min(_MATERIALIZE_BYTES, budget // 4)


def sweep(
    base: Model,
    donor: Model,
    batch: Batch,
    metric: Metric,
    *,
    granularity: str = "module",
    selector: SelectorLike | None = None,
    candidates: Sequence[Component] | Mapping[str, Patch] | None = None,
    direction: str = "denoise",
    references: Sequence[Params] | None = None,
    chunk_size: int | None = None,
    materialize: bool | None = None,
    memory_fraction: float = 0.3,
    progress: bool = True,
    positions: str = "last",
    inputs: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Scores every candidate patch exactly.

    Arguments:
        base: the base model.
        donor: the behavior-specialized model (same architecture).
        batch: prompts and readout positions (`jaxpatch.prompts.make_batch`).
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

    Returns:
        A `SweepResult` in candidate order.

    Example:
        >>> import jax, jaxpatch
        >>> from jaxpatch.prompts import Prompt, make_batch
        >>> from jaxpatch.metrics import VectorAnchor
        >>> cfg = jaxpatch.ModelConfig.tiny("llama")
        >>> base = jaxpatch.Model(cfg, jaxpatch.init_params(cfg, jax.random.key(0)))
        >>> donor = jaxpatch.Model(cfg, jaxpatch.init_params(cfg, jax.random.key(1)))
        >>> r = sweep(base, donor, make_batch(cfg, [Prompt((1, 2, 3))]), VectorAnchor(layer=1),
        ...           progress=False)
        >>> len(r.names)
        21
    """
    wall_start = time.perf_counter()
    config = base.config
    check_pair(base, donor)
    metric.check(config)
    start, target = _endpoints(base, donor, direction, references)
    stop = metric.layer
    last_block = config.n_layers - 1 if stop is None else stop
    count = last_block + 2 if stop is None else last_block + 1
    stacked = {id(base.params): _stacked_checked(base.params, "base"),
               id(donor.params): _stacked_checked(donor.params, "donor")}
    for params in (start, target):
        if id(params) not in stacked:
            stacked[id(params)] = _stacked_checked(params, "ablation target")
    runs = {key: _run_stacked(config, stacked[key], _without_layers(p), batch, stop, count)
            for key, p in ((id(base.params), base.params), (id(donor.params), donor.params),
                           (id(start), start))}
    x_base, x_donor = runs[id(base.params)][0], runs[id(donor.params)][0]
    state, base_score, donor_score = endpoint_scores(config, base, donor, batch, metric,
                                                     (x_base, x_donor))
    start_score = float(mean_score(metric, runs[id(start)][0], batch, state))

    if candidates is None:
        candidates = select(config, selector, granularity)
    cands = _candidates(config, candidates)
    run = [c for c in cands if c.first_layer <= last_block
           or (stop is None and c.first_layer == config.n_layers)]
    skipped = [c.name for c in cands if c not in run]
    scores: dict[str, float] = {name: start_score for name in skipped}

    start_stacked, start_rest = stacked[id(start)], _without_layers(start)
    before = runs[id(start)][1]
    flat_start, flat_target = flatten_params(start), flatten_params(target)
    budget = int(available_memory_bytes() * memory_fraction)
    auto_chunk = max(1, min(256, budget // max(_per_candidate_bytes(config, batch), 1)))
    nbytes = lambda n: int(np.prod(flat_start[n].shape)) * flat_start[n].dtype.itemsize  # noqa: E731
    shapes = alpha_shapes(config)
    plans: list[_Plan] = []

    local = [c for c in run if _is_block_local(c, last_block)]
    if local:
        by_layer: dict[int, list[_Candidate]] = {}
        for c in local:
            by_layer.setdefault(c.first_layer, []).append(c)
        relative = lambda c: f"layers.{c.first_layer}."  # noqa: E731
        used = {n[len(relative(c)):] for c in local for n in c.leaves}
        signature = tuple(n[len("layers.0."):] for n in flat_start
                          if n.startswith("layers.0.") and n[len("layers.0."):] in used)
        size = _chunk_size(chunk_size, auto_chunk, max(len(g) for g in by_layer.values()))
        dense = _use_dense(materialize, size, sum(nbytes(f"layers.0.{n}") for n in signature), budget)
        deltas = _stacked_deltas(stacked[id(target)], start_stacked, signature)
        groups = [g for _, g in sorted(by_layer.items())]
        args = [(start_stacked, deltas, start_rest, None, before[g[0].first_layer],
                 jnp.int32(g[0].first_layer), batch, state) for g in groups]
        plans.append(_Plan(groups, relative, size, args, 3,
                           ("local", config, metric, stop, signature, dense),
                           _local_chunk_function(config, metric, stop, dense),
                           {n: jax.ShapeDtypeStruct((size, *shapes[f"layers.0.{n}"]), jnp.float32)
                            for n in signature}))

    general: dict[int, list[_Candidate]] = {}
    for c in run:
        if not _is_block_local(c, last_block):
            general.setdefault(c.first_layer, []).append(c)
    for first_layer, group in sorted(general.items()):
        used = {n for c in group for n in c.leaves}
        signature = tuple(n for n in flat_start if n in used)
        size = _chunk_size(chunk_size, auto_chunk, len(group))
        dense = _use_dense(materialize, size, sum(nbytes(n) for n in signature), budget)
        start_layer = max(first_layer, 0)
        deltas = _deltas(flat_target, flat_start, signature)
        residual = None if first_layer < 0 else before[start_layer]
        plans.append(_Plan([group], lambda c: "", size,
                           [(start, deltas, None, residual, batch, state)], 2,
                           ("general", config, metric, start_layer, stop, signature, dense),
                           _general_chunk_function(config, metric, start_layer, stop, dense),
                           {n: jax.ShapeDtypeStruct((size, *shapes[n]), jnp.float32)
                            for n in signature}))

    prepare_s = time.perf_counter() - wall_start
    compile_s = _compile_all(plans)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(run), unit="cand", desc=f"sweep {direction}", disable=not progress,
               dynamic_ncols=True)
    for plan in plans:
        for group, args in zip(plan.groups, plan.args):
            for offset in range(0, len(group), plan.size):
                chunk = group[offset: offset + plan.size]
                rows = _alpha_rows(config, chunk, plan.alpha_specs, plan.prefix)
                call_args = plan.with_alphas(args, {n: jnp.asarray(a) for n, a in rows.items()})
                values = np.asarray(_compiled(plan.key, plan.fn, call_args)(*call_args))
                scores.update({c.name: float(v) for c, v in zip(chunk, values)})
                bar.update(len(chunk))
    bar.close()

    names = [c.name for c in cands]
    values = np.array([scores[n] for n in names], np.float64)
    bad = [n for n, v in zip(names, values) if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"the score of {bad[0]!r} is NaN or Inf"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    wall = time.perf_counter() - wall_start
    sweep_s = wall - prepare_s - compile_s
    timing = {"wall_s": wall, "prepare_s": prepare_s, "compile_s": compile_s, "sweep_s": sweep_s,
              "candidates_per_s": len(run) / max(sweep_s, 1e-9)}
    return SweepResult(metric.name, direction, metric.layer, positions, base_score, donor_score,
                       names, values, timing, dict(inputs or {}), skipped)


def _score(config: ModelConfig, params: Params, batch: Batch, metric: Metric, state: Any) -> float:
    return float(mean_score(metric, readout(config, params, batch, metric.layer), batch, state))


def score_patch(base: Model, donor: Model, patch: Patch, batch: Batch, metric: Metric,
                direction: str = "denoise", state: Any = None) -> float:
    """The metric score of one patch, by patching the params and running the plain forward.

    This is the reference `sweep` is tested against; use `sweep` for many candidates.

    Example:
        >>> # score_patch(base, donor, Patch.from_selector(cfg, "layers.1"), batch, metric)
    """
    from jaxpatch.patch import apply

    start, target = _endpoints(base, donor, direction, None)
    if state is None:
        state = metric.prepare(base.config, base.params, donor.params, batch)
    return _score(base.config, apply(patch, start, target), batch, metric, state)
