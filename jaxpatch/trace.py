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

Candidates are a leading axis on per-site coefficients (`beta`), vmapped over in padded chunks
that compile once, as in `jaxpatch.sweep`. Scores are on the sweep's scale, so the two
methods' tables compare directly.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.components import Component, SelectorLike, activation_sites, component_sites, select
from jaxpatch.errors import JaxpatchError
from jaxpatch.metrics import Metric, mean_score
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.models.model import Model
from jaxpatch.modes import PAIR_DIRECTIONS, Granularity, PairDirection, Positions, check_mode
from jaxpatch.pair import check_pair, endpoint_scores
from jaxpatch.prompts import Batch
from jaxpatch.results import SweepResult, check_finite_scores, run_timing

__all__ = ["activation_patching"]

Betas = dict[str, jax.Array]


def _betas(config: ModelConfig, chunk: Sequence[Component], size: int) -> dict[str, np.ndarray]:
    """Per-site coefficients `[size, axis]` for a chunk (padding rows stay 0)."""
    out = {site: np.zeros((size, n), np.float32) for site, n in activation_sites(config).items()}
    for row, component in enumerate(chunk):
        for site, index in component_sites(component).items():
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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sources(config: ModelConfig, params: Params, batch: Batch, layer: int | None) -> dict[str, jax.Array]:
    """Every site's output in a clean run of `params`."""
    store: dict[str, jax.Array] = {}
    forward(config, params, batch.tokens, batch.mask, stop_layer=layer,
            edit=functools.partial(_record, store))
    return store


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_scores(config: ModelConfig, metric: Metric, params: Params, sources: dict[str, jax.Array],
                  betas: Betas, batch: Batch, state: Any) -> jax.Array:
    """Mean metric scores `[chunk]` of runs of `params` with site outputs moved towards
    `sources` by each candidate's coefficients."""

    def one(beta: Betas) -> jax.Array:
        def edit(site: str, value: jax.Array) -> jax.Array:
            if site not in sources:
                return value
            b = _broadcast(beta[site], value).astype(value.dtype)
            return value + b * (sources[site] - value)

        # The whole sequence runs (no readout_positions): every site's value must keep the
        # shape of its recorded source.
        out = forward(config, params, batch.tokens, batch.mask, stop_layer=metric.layer, edit=edit)
        x = jnp.take_along_axis(out.read(metric.layer), batch.positions[..., None], axis=1)
        return mean_score(metric, x, batch, state)

    return jax.vmap(one)(betas)


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

    Returns:
        A `SweepResult` with `method="activation"`, in candidate order; components after the
        metric's anchor layer score exactly the unpatched model.

    Example:
        >>> r = activation_patching(base, donor, batch, jaxpatch.KLDivergence(), progress=False)
        >>> r.method, len(r.names)
        ('activation', 21)
    """
    wall_start = time.perf_counter()
    config = base.config
    check_pair(base, donor)
    metric.check(config)
    check_mode("activation patching direction", direction, PAIR_DIRECTIONS, JaxpatchError)
    start, source = (base, donor) if direction == "denoise" else (donor, base)
    items = select(config, selector, granularity)
    state, base_score, donor_score = endpoint_scores(config, base, donor, batch, metric)
    sources = _sources(config, source.params, batch, metric.layer)
    size = max(1, min(chunk_size, len(items)))
    from tqdm.auto import tqdm

    scores: list[float] = []
    compile_start = time.perf_counter()
    prepare_s, compile_s = compile_start - wall_start, 0.0
    with tqdm(total=len(items), unit="cand", desc=f"activation {direction}", disable=not progress,
              dynamic_ncols=True) as bar:
        for offset in range(0, len(items), size):
            chunk = items[offset: offset + size]
            betas = {k: jnp.asarray(v) for k, v in _betas(config, chunk, size).items()}
            values = np.asarray(_chunk_scores(config, metric, start.params, sources, betas, batch, state))
            if offset == 0:
                compile_s = time.perf_counter() - compile_start  # the first chunk compiles
            scores += [float(v) for v in values[: len(chunk)]]
            bar.update(len(chunk))
    names = [c.name for c in items]
    values = np.array(scores, np.float64)
    check_finite_scores(names, values, "activation patching score")
    return SweepResult(metric.name, direction, metric.layer, positions, base_score, donor_score,
                       names, values, run_timing(wall_start, prepare_s, compile_s, len(items)),
                       dict(inputs or {}), method="activation")
