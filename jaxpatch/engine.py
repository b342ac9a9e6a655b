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

import csv
import dataclasses
import functools
import io
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.errors import JaxpatchError
from jaxpatch.metrics import Metric, MetricError
from jaxpatch.models.config import ModelConfig, Params, flatten_params
from jaxpatch.models.decoder import MixedWeight, embed, forward
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
            "skipped": self.skipped, "timing": self.timing, "inputs": self.inputs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepResult":
        """Rebuilds a result from `to_dict` output."""
        comps = data["components"]
        return cls(data["metric"], data["direction"], data["anchor_layer"], data["positions"],
                   data["base_score"], data["donor_score"], [c["name"] for c in comps],
                   np.array([c["score"] for c in comps], np.float64), dict(data.get("timing", {})),
                   dict(data.get("inputs", {})), list(data.get("skipped", [])))

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


def _alpha_rows(config: ModelConfig, group: Sequence[_Candidate], signature: tuple[str, ...],
                size: int) -> dict[str, np.ndarray]:
    """Stacked alpha coefficients of a chunk of candidates, zero rows as padding."""
    shapes = alpha_shapes(config)
    rows = {name: np.zeros((size, *shapes[name]), np.float32) for name in signature}
    for i, cand in enumerate(group):
        if cand.component is not None:
            for name, index in component_entries(config, cand.component).items():
                rows[name][(i, *index)] = 1.0
        else:
            flat = flatten_params(cand.patch.alpha)  # type: ignore[union-attr]
            for name in cand.leaves:
                rows[name][i] = np.asarray(flat[name])
    return rows


# --------------------------------------------------------------------------- compiled chunks

_COMPILED: dict[Any, Any] = {}


def _replace_leaves(params: Params, replacements: Mapping[str, Any]) -> Params:
    flat, treedef = jax.tree_util.tree_flatten(params)
    names = list(flatten_params(params))
    return jax.tree_util.tree_unflatten(treedef, [replacements.get(n, leaf) for n, leaf in zip(names, flat)])


def _chunk_function(config: ModelConfig, metric: Metric, start_layer: int, stop_layer: int | None,
                    signature: tuple[str, ...], materialize: bool) -> Callable[..., jax.Array]:
    """Scores of a chunk of candidates: alpha rows -> `[chunk]` mean scores over prompts."""

    def run(start: Params, deltas: dict[str, jax.Array], alphas: dict[str, jax.Array],
            residual: jax.Array | None, batch: Batch, state: Any) -> jax.Array:
        flat = flatten_params(start)

        def one(alpha: dict[str, jax.Array]) -> jax.Array:
            mixed = {n: MixedWeight(flat[n], deltas[n], alpha[n]) for n in signature}
            if materialize:
                mixed = {n: m.value() for n, m in mixed.items()}
            out = forward(config, _replace_leaves(start, mixed), batch.tokens, batch.mask,
                          start_layer=start_layer, residual=residual, stop_layer=stop_layer,
                          readout_positions=batch.positions)
            x = out.residual if stop_layer is not None else out.logits
            return jnp.mean(metric.score(x, batch, state))

        return jax.vmap(one)(alphas)

    return run


def _compiled(key: Any, fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    shapes = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), args)
    full_key = (key, jax.tree_util.tree_structure(args), tuple(jax.tree_util.tree_leaves(shapes)))
    if full_key in _COMPILED:
        return _COMPILED[full_key], 0.0
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    _COMPILED[full_key] = compiled
    return compiled, time.perf_counter() - start


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
def _all_finite(params: Params) -> Params:
    return jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)


def _check_finite(params: Params, which: str) -> None:
    for name, ok in flatten_params(_all_finite(params)).items():
        if not bool(ok):
            raise NonFiniteError(f"{which} tensor {name!r} holds NaN or Inf")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _residuals_before_blocks(config: ModelConfig, params: Params, batch: Batch,
                             last_block: int) -> list[jax.Array]:
    """The residual stream before each block 0..last_block, and after last_block."""
    out = forward(config, params, batch.tokens, batch.mask, stop_layer=last_block, collect=True)
    return [embed(config, params, batch.tokens), *out.residuals]


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
        materialize: build each candidate's patched block weights (True), keep them factored
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
    _check_finite(base.params, "base")
    _check_finite(donor.params, "donor")
    start, target = _endpoints(base, donor, direction, references)
    state = metric.prepare(config, base.params, donor.params, batch)
    stop = metric.layer
    base_score = _score(config, base.params, batch, metric, state)
    donor_score = _score(config, donor.params, batch, metric, state)
    start_score = base_score if start is base.params else _score(config, start, batch, metric, state)
    if not math.isfinite(base_score) or not math.isfinite(donor_score):
        raise NonFiniteError(f"the {metric.name} score is not finite (base {base_score}, donor "
                             f"{donor_score})")
    if base_score == donor_score:
        raise MetricError(f"base and donor have the same {metric.name} score ({base_score}): "
                          "recovery is undefined on these prompts")

    if candidates is None:
        candidates = select(config, selector, granularity)
    cands = _candidates(config, candidates)
    last_block = config.n_layers - 1 if stop is None else stop
    run = [c for c in cands if c.first_layer <= last_block or (stop is None and c.first_layer == config.n_layers)]
    skipped = [c.name for c in cands if c not in run]

    before = _residuals_before_blocks(config, start, batch, last_block)
    deltas_all = jax.jit(lambda t, s: jax.tree_util.tree_map(jnp.subtract, t, s))(target, start)
    flat_delta = flatten_params(deltas_all)

    groups: dict[int, list[_Candidate]] = {}
    for c in run:
        groups.setdefault(c.first_layer, []).append(c)
    budget = int(available_memory_bytes() * memory_fraction)
    per_candidate = _per_candidate_bytes(config, batch)
    auto_chunk = max(1, min(256, budget // max(per_candidate, 1)))
    scores: dict[str, float] = {c.name: start_score for c in cands if c.name in skipped}
    compile_s = 0.0

    from tqdm.auto import tqdm

    prepare_s = time.perf_counter() - wall_start
    bar = tqdm(total=len(run), unit="cand", desc=f"sweep {direction}", disable=not progress,
               dynamic_ncols=True)
    for first_layer, group in sorted(groups.items()):
        signature = tuple(n for n in flat_delta if any(n in c.leaves for c in group))
        size = min(chunk_size or auto_chunk, len(group))
        sig_bytes = sum(int(np.prod(flat_delta[n].shape)) * flat_delta[n].dtype.itemsize for n in signature)
        use_dense = (materialize if materialize is not None
                     else size * sig_bytes <= min(_MATERIALIZE_BYTES, budget // 4))
        start_layer = max(first_layer, 0)
        residual = None if first_layer < 0 else before[start_layer]
        fn = _chunk_function(config, metric, start_layer, stop, signature, use_dense)
        deltas = {n: flat_delta[n] for n in signature}
        key = (config, metric, start_layer, stop, signature, use_dense)
        for offset in range(0, len(group), size):
            chunk = group[offset: offset + size]
            alphas = {n: jnp.asarray(a) for n, a in _alpha_rows(config, chunk, signature, size).items()}
            args = (start, deltas, alphas, residual, batch, state)
            compiled, seconds = _compiled(key, fn, args)
            compile_s += seconds
            values = np.asarray(compiled(*args))
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
    from jaxpatch.metrics import readout

    return float(jnp.mean(metric.score(readout(config, params, batch, metric.layer), batch, state)))


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
