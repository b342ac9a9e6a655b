"""The standard data-free merges of one tensor, as pure jitted functions (mergekit's numerics).

Every function merges the same tensor of several models (as Hugging Face stores it: the
methods that select elements by magnitude or interpolate whole tensors depend on the layout).

    linear            sum_i w_i x_i, divided by sum_i w_i when normalizing
    task_arithmetic   base + lambda * sum_i w_i (x_i - base) [/ sum_i w_i when normalizing]
    ties              task arithmetic on deltas trimmed to their top `density` by magnitude,
                      keeping per element only the deltas whose sign agrees with the sign of
                      the weighted sum (TIES-merging), normalized by the agreeing weights
    dare_linear       task arithmetic on deltas with each element kept with probability
                      `density`, rescaled to the delta's L1 norm (`rescale`)
    dare_ties         the same random drop, then TIES' sign consensus
    breadcrumbs       task arithmetic on deltas that keep their `density` share of elements
                      by magnitude after dropping the `gamma` share of largest ones (Model
                      Breadcrumbs: the outliers and the small ones both go)
    breadcrumbs_ties  the same trim, then TIES' sign consensus
    model_stock       an interpolation between the base and the experts' average, by how
                      alike the experts' deltas point (Model Stock: t = n cos / (1 + (n - 1) cos)
                      from their mean pairwise cosine), over the whole tensor or per row
    consensus_ta      task arithmetic on the elements that at least `k` experts' TALL masks keep
                      (Consensus Merging, Wang et al. 2024: expert t's mask keeps the elements
                      where |tau_t| > mask_lambda * |tau_sum - tau_t|, tau_t = x_t - base)
    slerp             spherical interpolation from base (t = 0) to the other model (t = 1)
                      over the whole tensor; linear when the two are nearly parallel

Computation is in float32 (float64 inputs stay float64) and the result takes the inputs' dtype,
as in mergekit 0.1.5. DARE's random mask comes from a JAX key: the same keep probability and
rescaling as mergekit, not the same draws as torch's generator.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jaxpatch.modes import check_mode
from jaxpatch.rounding import jit

__all__ = ["linear", "task_arithmetic", "slerp", "model_stock", "tall_masks", "consensus_ta",
           "keep_count", "outlier_window", "magnitude_mask", "random_mask", "rescale_l1", "consensus_mask",
           "generalized_task_arithmetic", "sum_models"]

Array = jax.Array
Sparsify = Literal["magnitude", "magnitude_outliers", "random"]


def sum_models(x: Array) -> Array:
    """The sum over the leading (models) axis, added one model at a time. XLA on CPU runs a
    leading-axis `sum` fused with the elementwise work before it several hundred times slower
    than these adds (0.5 s against 1 ms for two 2048 x 640 deltas), and merges are made of such
    sums; the adds run in the same order as a sequential reduction.

    Example:
        >>> sum_models(jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])).tolist()
        [9.0, 12.0]
    """
    total = x[0]
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


def _work_dtype(x: Array) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if x.dtype == jnp.float64 else jnp.dtype(jnp.float32)


@functools.partial(jit, static_argnames=("normalize",))
def linear(tensors: Array, weights: Array, normalize: bool = True) -> Array:
    """The weighted sum of `tensors` `[n, ...]` with `weights` `[n]`.

    Example:
        >>> linear(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([1.0, 3.0])).tolist()
        [2.5, 3.5]
    """
    dtype = _work_dtype(tensors)
    w = weights.astype(dtype).reshape((-1,) + (1,) * (tensors.ndim - 1))
    out = sum_models(tensors.astype(dtype) * w)
    if normalize:
        out = out / jnp.sum(weights.astype(dtype))
    return out.astype(tensors.dtype)


@functools.partial(jit, static_argnames=("normalize",))
def task_arithmetic(base: Array, tensors: Array, weights: Array, normalize: bool = False,
                    lam: float = 1.0) -> Array:
    """`base + lam * sum_i w_i (tensors_i - base)`, divided by `sum_i w_i` when normalizing.

    Example:
        >>> task_arithmetic(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, 1.0]]),
        ...                 jnp.array([1.0, 0.5])).tolist()
        [1.0, 0.5]
    """
    size = jnp.full(weights.shape, base.size, jnp.int32)
    return generalized_task_arithmetic(base, tensors, weights, jnp.ones_like(weights), size,
                                       None, None, normalize, False, lam, jax.random.key(0))


def keep_count(density: float, size: int) -> int:
    """How many elements magnitude sparsification keeps: all at density >= 1, none at
    density <= 0, else `max(1, int(density * size))` (mergekit's rule, in Python floats).

    Example:
        >>> keep_count(0.3, 1000), keep_count(1e-9, 10), keep_count(1.0, 7)
        (300, 1, 7)
    """
    if density >= 1:
        return size
    if density <= 0:
        return 0
    return max(1, int(density * size))


def outlier_window(density: float, gamma: float, size: int) -> tuple[int, int]:
    """Which elements Model Breadcrumbs keeps, as (keep, skip): the `keep` elements after the
    `skip` of largest |delta|. `int(density * size)` are kept after dropping the `int(gamma *
    size)` largest, fewer dropped where that would leave too few; everything at density >= 1
    (mergekit's rule, in Python floats).

    Example:
        >>> outlier_window(0.5, 0.1, 100), outlier_window(0.95, 0.1, 100), outlier_window(1.0, 0.1, 7)
        ((50, 10), (95, 5), (7, 0))
    """
    if density >= 1:
        return size, 0
    keep = int(density * size)
    return keep, min(int(gamma * size), size - keep)


def magnitude_mask(delta: Array, k: Array, skip: Array | int = 0,
                   ties: Literal["earlier", "later"] = "earlier") -> Array:
    """1 on the `k` elements of largest |delta| after the `skip` largest, 0 elsewhere; among
    equal magnitudes the earlier element ranks first (`ties="earlier"`) or the later one
    (`"later"`).

    The ranks are those of a stable sort by |delta|: descending (`"earlier"`, as TIES'
    `argsort(descending=True)` would rank with a stable sort) or the reverse of ascending
    (`"later"`, as Model Breadcrumbs' ascending sort would with a stable sort); mergekit's own
    sorts are not stable, so it may pick other elements of equal magnitude at a cut. Found
    without sorting (XLA's sort on CPU takes 0.4 s for a 2048 x 640 matrix): the top `m`
    elements are those above the m-th largest magnitude, found by bisection over the
    magnitudes' bit patterns (ordered as the non-negative floats they encode), and the first
    (or last) of those equal to it.

    Example:
        >>> magnitude_mask(jnp.array([0.1, -3.0, 2.0, 0.5]), jnp.int32(2)).tolist()
        [0.0, 1.0, 1.0, 0.0]
        >>> magnitude_mask(jnp.array([0.1, -3.0, 2.0, 0.5]), jnp.int32(2), jnp.int32(1)).tolist()
        [0.0, 0.0, 1.0, 1.0]
        >>> magnitude_mask(jnp.array([1.0, -1.0, 1.0]), jnp.int32(1), ties="later").tolist()
        [0.0, 0.0, 1.0]
    """
    check_mode("magnitude_mask ties", ties, ("earlier", "later"), ValueError)
    bits = jax.lax.bitcast_convert_type(jnp.abs(delta.reshape(-1)).astype(jnp.float32), jnp.int32)
    skip = jnp.asarray(skip, jnp.int32)
    kept = _top(bits, skip + jnp.asarray(k, jnp.int32), ties) & ~_top(bits, skip, ties)
    return kept.astype(delta.dtype).reshape(delta.shape)


def _top(bits: Array, m: Array, ties: Literal["earlier", "later"]) -> Array:
    """The `m` elements ranked first by bit pattern (descending), then by index (ascending
    for `ties="earlier"`, descending for `"later"`)."""
    def halve(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        low, high = bounds  # count(bits >= low) >= m > count(bits > high)
        middle = low + (high - low + 1) // 2
        enough = jnp.sum(bits >= middle) >= m
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle - 1)

    infinity = 0x7F800000  # the largest magnitude's bits (NaN aside)
    edge, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(infinity)))
    above = bits > edge
    equal = bits == edge
    rank = jnp.cumsum(equal.astype(jnp.int32))  # among the equal elements, 1 = the earliest
    if ties == "later":
        rank = jnp.sum(equal) + 1 - rank  # 1 = the latest
    return (above | (equal & (rank <= m - jnp.sum(above)))) & (m > 0)


def random_mask(delta: Array, density: Array, key: Array) -> Array:
    """Each element kept (1) with probability `density` (all ones at density >= 1).

    Example:
        >>> m = random_mask(jnp.ones(10000), jnp.float32(0.3), jax.random.key(0))
        >>> 0.27 < float(m.mean()) < 0.33
        True
    """
    keep = jax.random.bernoulli(key, density, delta.shape).astype(delta.dtype)
    return jnp.where(density >= 1, jnp.ones_like(keep), keep)


def rescale_l1(delta: Array, mask: Array, eps: float = 1e-7) -> Array:
    """`delta * mask`, rescaled so its L1 norm equals `delta`'s (unchanged when either norm is
    below `eps`).

    Example:
        >>> rescale_l1(jnp.array([1.0, -1.0, 2.0, 0.0]), jnp.array([1.0, 0.0, 0.0, 1.0])).tolist()
        [4.0, -0.0, 0.0, 0.0]
    """
    masked = delta * mask
    before, after = jnp.abs(delta).sum(), jnp.abs(masked).sum()
    small = (before < eps) | (after < eps)
    return jnp.where(small, masked, masked * (before / jnp.where(small, 1, after)))


def consensus_mask(deltas: Array) -> Array:
    """TIES' sign election: 1 where a delta's sign equals the sign of the sum over models
    (ties to +), else 0 (zero deltas never agree).

    Example:
        >>> consensus_mask(jnp.array([[1.0, -2.0], [-0.5, 1.0]])).tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """
    majority = jnp.where(sum_models(deltas) >= 0, 1.0, -1.0).astype(deltas.dtype)
    return (jnp.sign(deltas) == majority).astype(deltas.dtype)


@functools.partial(jit, static_argnames=("sparsify", "consensus", "normalize", "rescale"))
def generalized_task_arithmetic(base: Array, tensors: Array, weights: Array, densities: Array,
                                keeps: Array, sparsify: Sparsify | None, consensus: str | None,
                                normalize: bool, rescale: bool, lam: float, key: Array,
                                skips: Array | None = None) -> Array:
    """Task arithmetic with optional sparsification and sign consensus (mergekit's
    `GeneralizedTaskArithmeticMerge`): the core of task_arithmetic, ties, dare_linear,
    dare_ties, breadcrumbs and breadcrumbs_ties.

    Arguments:
        base: the base model's tensor.
        tensors: the experts' tensors `[n, ...]`.
        weights, densities: per expert `[n]`.
        keeps: per expert `[n]`, how many elements magnitude sparsification keeps
            (`keep_count`, or `outlier_window`'s keep).
        sparsify: None, "magnitude" (TIES: the `keeps` largest |delta|, equal ones earlier
            first), "magnitude_outliers" (Model Breadcrumbs: the `keeps` after the `skips`
            largest, equal ones later first) or "random" (DARE); the tie rules are mergekit's
            sorts made stable (`magnitude_mask`).
        consensus: None or "sum" (TIES' sign election).
        normalize: divide by the (agreeing) weights' sum.
        rescale: rescale each sparsified delta to its L1 norm.
        lam: scale of the merged delta.
        key: the random key of "random" sparsification.
        skips: per expert `[n]`, how many of the largest elements "magnitude_outliers"
            drops before keeping (`outlier_window`'s skip; default none).

    Returns:
        The merged tensor, in the base's dtype.

    Example:
        >>> generalized_task_arithmetic(jnp.zeros(2), jnp.array([[1.0, -1.0], [1.0, 2.0]]),
        ...     jnp.ones(2), jnp.ones(2), jnp.full(2, 2), None, "sum", True, False, 1.0,
        ...     jax.random.key(0)).tolist()
        [1.0, 2.0]
    """
    dtype = base.dtype
    deltas = tensors.astype(dtype) - base
    if sparsify is not None:
        keys = jax.random.split(key, tensors.shape[0])
        skip = jnp.zeros_like(keeps) if skips is None else skips
        masks = []
        for i in range(tensors.shape[0]):
            mask = (random_mask(deltas[i], densities[i], keys[i]) if sparsify == "random"
                    else magnitude_mask(deltas[i], keeps[i], skip[i],
                                        "later" if sparsify == "magnitude_outliers" else "earlier"))
            masks.append(rescale_l1(deltas[i], mask) if rescale else deltas[i] * mask)
        deltas = jnp.stack(masks)
    w = weights.astype(dtype).reshape((-1,) + (1,) * (deltas.ndim - 1))
    deltas = deltas * w
    if consensus is not None:
        mask = consensus_mask(deltas)
        mixed = sum_models(deltas * mask)
        divisor = sum_models(w * mask)
        divisor = jnp.where(divisor == 0, 1, divisor)
    else:
        mixed = sum_models(deltas)
        divisor = sum_models(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    mixed = mixed * jnp.asarray(lam, dtype)
    return (base + mixed).astype(dtype)


@functools.partial(jit, static_argnames=("filter_wise",))
def model_stock(base: Array, tensors: Array, filter_wise: bool = False) -> Array:
    """Model Stock (Jang et al., 2024): `t * mean_i(x_i) + (1 - t) * base` with
    `t = n cos / (1 + (n - 1) cos)`, cos the mean cosine between the experts' deltas (pairs
    i < j), over the whole tensor or, with `filter_wise`, per row of a matrix; where
    `1 + (n - 1) cos` vanishes the base is kept (mergekit's rule).

    Arguments:
        base: the base model's tensor.
        tensors: the experts' tensors `[n, ...]`, n >= 2.
        filter_wise: one t per row (the last axis is the row) instead of one per tensor.

    Returns:
        The merged tensor, in the base's dtype.

    Example:
        >>> model_stock(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()  # cos 0: t 0
        [0.0, 0.0]
        >>> model_stock(jnp.zeros(2), jnp.array([[1.0, 1.0], [2.0, 2.0]])).tolist()  # cos 1: t 1
        [1.5, 1.5]
    """
    dtype = _work_dtype(base)
    n = tensors.shape[0]
    if filter_wise:
        w0 = base.astype(dtype).reshape((1, -1) if base.ndim == 1 else base.shape)
        ws = tensors.astype(dtype).reshape((n, *w0.shape))
    else:
        w0 = base.astype(dtype).reshape(-1)
        ws = tensors.astype(dtype).reshape(n, -1)
    offsets = ws - w0
    norms = jnp.linalg.norm(offsets, axis=-1)
    cosines = [jnp.clip(jnp.sum(offsets[i] * offsets[j], -1)
                        / jnp.maximum(norms[i] * norms[j], 1e-6), -1, 1)
               for i in range(n) for j in range(i + 1, n)]
    cos = jnp.mean(jnp.stack(cosines), axis=0)[..., None]
    denominator = 1 + (n - 1) * cos
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0, n * cos / jnp.where(singular, 1, denominator))
    merged = t * (sum_models(ws) / n) + (1 - t) * w0
    return merged.reshape(base.shape).astype(base.dtype)


@jit
def tall_masks(base: Array, tensors: Array, mask_lambda: float) -> Array:
    """Each expert's TALL mask (Wang et al., 2024): 1 where its task vector tau_t = x_t - base
    outweighs the other experts' sum there, |tau_t| > mask_lambda * |sum_s tau_s - tau_t|.

    Arguments:
        base: the base model's tensor.
        tensors: the experts' tensors `[n, ...]`.
        mask_lambda: how much the expert must outweigh the rest (the paper's lambda).

    Returns:
        The masks `[n, ...]` (0/1, in the work dtype).

    Example:
        >>> tall_masks(jnp.zeros(3), jnp.array([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0]]), 0.5).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    dtype = _work_dtype(base)
    deltas = tensors.astype(dtype) - base.astype(dtype)
    total = sum_models(deltas)
    return (jnp.abs(deltas) > mask_lambda * jnp.abs(total - deltas)).astype(dtype)


@jit
def consensus_ta(base: Array, tensors: Array, weights: Array, lam: float, mask_lambda: float,
                 k: int) -> Array:
    """Consensus task arithmetic (Wang et al., 2024): `base + lam * sum_t w_t tau_t` on the
    elements that at least `k` experts' TALL masks (`tall_masks`) keep, the base elsewhere.

    Arguments:
        base: the base model's tensor.
        tensors: the experts' tensors `[n, ...]`.
        weights: per expert `[n]`.
        lam: scale of the merged task vector.
        mask_lambda: the TALL masks' lambda.
        k: how many experts' masks must keep an element (0: task arithmetic).

    Returns:
        The merged tensor, in the base's dtype.

    Example:
        >>> consensus_ta(jnp.zeros(2), jnp.array([[1.0, 1.0], [1.0, -1.0]]), jnp.ones(2), 1.0,
        ...              0.5, 2).tolist()  # only the first element is kept by both masks
        [2.0, 0.0]
    """
    dtype = _work_dtype(base)
    deltas = tensors.astype(dtype) - base.astype(dtype)
    kept = sum_models(tall_masks(base, tensors, mask_lambda)) >= k
    w = weights.astype(dtype).reshape((-1,) + (1,) * (deltas.ndim - 1))
    merged = base.astype(dtype) + jnp.asarray(lam, dtype) * jnp.where(kept, sum_models(deltas * w), 0)
    return merged.astype(base.dtype)


@jit
def slerp(t: Array, v0: Array, v1: Array, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> Array:
    """Spherical interpolation between two tensors (flattened), t = 0 giving `v0`.

    Example:
        >>> [round(float(x), 4) for x in slerp(jnp.float32(0.5), jnp.array([1.0, 0.0]),
        ...                                    jnp.array([0.0, 1.0]))]
        [0.7071, 0.7071]
    """
    dtype = _work_dtype(v0)
    a, b = v0.reshape(-1).astype(dtype), v1.reshape(-1).astype(dtype)
    t = jnp.asarray(t, dtype)
    norm_a, norm_b = jnp.linalg.norm(a), jnp.linalg.norm(b)
    norm_a = jnp.where(norm_a > eps, norm_a, 1)
    norm_b = jnp.where(norm_b > eps, norm_b, 1)
    dot = jnp.clip(jnp.sum((a / norm_a) * (b / norm_b)), -1, 1)
    parallel = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(parallel, 0, dot))
    sin_theta = jnp.sin(theta)
    safe = jnp.where(parallel, 1, sin_theta)
    coef_a = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * theta) / safe)
    coef_b = jnp.where(parallel, t, jnp.sin(t * theta) / safe)
    return (coef_a * a + coef_b * b).reshape(v0.shape).astype(v0.dtype)
