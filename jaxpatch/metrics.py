"""Behavioral interfaces: what a patch is scored by.

A metric reads either the residual stream after an anchor block (`layer` set) or the logits
(`layer` None), at the batch's readout positions, and returns one score per prompt; the run's
score is their mean. Every metric is normalized the same way by the engine:
`recovery = (score(patched) - score(base)) / (score(donor) - score(base))`.

A metric is a frozen dataclass of static settings (hashable, so compiled sweeps are cached per
metric); whatever it computes from the base and donor runs (the anchor direction, the donor's
next-token distribution) is its *state*, a pytree returned by `prepare`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.errors import InvalidInputError, MetricError
from jaxpatch.io.atomic import atomic_write_bytes
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.prompts import Batch

__all__ = ["readout", "endpoint_readouts", "Metric", "VectorAnchor", "anchor_direction",
           "mean_score", "save_anchor", "load_anchor", "LogitDiff", "KLDivergence", "LogProb",
           "CustomMetric", "metric_from_name"]

Array = jax.Array


@functools.partial(jax.jit, static_argnums=(0, 3))
def readout(config: ModelConfig, params: Params, batch: Batch, layer: int | None) -> Array:
    """What a metric reads from a model: the residual after block `layer` (or the logits when
    None) at the batch's readout positions, `[P, Q, d_model]` or `[P, Q, vocab]`.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import init_params
        >>> from jaxpatch.prompts import Prompt, make_batch
        >>> cfg = ModelConfig.tiny("llama")
        >>> b = make_batch(cfg, [Prompt((1, 2, 3))])
        >>> readout(cfg, init_params(cfg, jax.random.key(0)), b, 0).shape
        (1, 1, 32)
    """
    return forward(config, params, batch.tokens, batch.mask, stop_layer=layer,
                   readout_positions=batch.positions).read(layer)


def endpoint_readouts(config: ModelConfig, base: Params, donor: Params, batch: Batch,
                      layer: int | None) -> tuple[Array, Array]:
    """The base's and the donor's readouts (`readout`), which a metric's state is fitted to.

    Example:
        >>> x_base, x_donor = endpoint_readouts(cfg, base.params, donor.params, batch, 1)
        >>> x_base.shape
        (3, 1, 32)
    """
    return readout(config, base, batch, layer), readout(config, donor, batch, layer)


class Metric:
    """Base class: `layer` (None for logits), `prepare` and `score`."""

    name: str = "metric"
    layer: int | None = None
    state_per_prompt: bool = False  # the state has a leading prompt axis (sliced with the batch)

    def check(self, config: ModelConfig) -> None:
        """Refuses settings that do not fit the architecture."""
        if self.layer is not None and not 0 <= self.layer < config.n_layers:
            raise MetricError(f"anchor layer {self.layer} is out of range: the model has blocks "
                              f"0..{config.n_layers - 1}")

    def prepare(self, config: ModelConfig, base: Params, donor: Params, batch: Batch,
                readouts: tuple[Array, Array] | None = None) -> Any:
        """The metric's state, computed once per run from the base and donor models.

        `readouts` may pass the base's and donor's readouts when the caller already has them.
        """
        return ()

    def score(self, x: Array, batch: Batch, state: Any) -> Array:
        """Per-prompt scores `[P]` from a readout `x` (`[P, Q, d_model]` or `[P, Q, vocab]`)."""
        raise NotImplementedError


def _weighted(values: Array, batch: Batch) -> Array:
    """Per-prompt weighted sum over readout positions."""
    return jnp.sum(values * batch.weights, axis=-1)


@dataclasses.dataclass(frozen=True)
class VectorAnchor(Metric):
    """The vector anchor: projection of the residual stream after block `layer` onto the
    normalized mean donor-minus-base difference at the readout positions.

    `v = mean over prompts of (mean over positions of h_donor - h_base)`; a model's score is the
    mean over prompts of `<mean over positions of h, v / |v|>`.

    Attributes:
        layer: the anchor block (0-based); the residual stream after it is read.
        path: load the direction from this file (written by `save_anchor`) instead of fitting
            it to the base and donor.

    Example:
        >>> VectorAnchor(layer=3).name
        'anchor'
    """

    layer: int = 0
    path: str | None = None
    name: str = "anchor"

    def prepare(self, config: ModelConfig, base: Params, donor: Params, batch: Batch,
                readouts: tuple[Array, Array] | None = None) -> Array:
        self.check(config)
        if self.path is not None:
            return load_anchor(self.path, config, self.layer)
        h_base, h_donor = readouts or endpoint_readouts(config, base, donor, batch, self.layer)
        return anchor_direction(h_base, h_donor, batch, self.layer)

    def score(self, x: Array, batch: Batch, state: Array) -> Array:
        return _weighted(jnp.einsum("pqd,d->pq", x.astype(jnp.float32), state), batch)


def anchor_direction(h_base: Array, h_donor: Array, batch: Batch, layer: int) -> Array:
    """The unit anchor direction from base and donor readouts `[P, Q, d_model]`.

    Raises:
        MetricError: the direction has zero length (donor and base do not differ there).

    Example:
        >>> from jaxpatch.prompts import Batch
        >>> ones = jnp.ones((1, 1))
        >>> b = Batch(ones, ones, ones, ones, ones, ones)
        >>> anchor_direction(jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 2)), b, 0).tolist()
        [0.7071067690849304, 0.7071067690849304]
    """
    v, length, scale = (np.asarray(a) for a in _mean_difference(h_base, h_donor, batch.weights))
    length, scale = float(length), float(scale) or 1.0
    if not np.isfinite(length) or length <= 1e-7 * scale:
        raise MetricError(f"the anchor direction at layer {layer} has zero length: donor and base "
                          "do not differ there on these prompts; choose another layer or prompts")
    return jnp.asarray(v / length)


@jax.jit
def _mean_difference(h_base: Array, h_donor: Array, weights: Array) -> tuple[Array, Array, Array]:
    """The mean over prompts of the weighted donor-minus-base difference, its length, and the
    largest base residual norm (to judge the length against)."""
    diff = (h_donor.astype(jnp.float32) - h_base.astype(jnp.float32)) * weights[..., None]
    v = diff.sum(axis=1).mean(axis=0)
    return v, jnp.linalg.norm(v), jnp.linalg.norm(h_base.astype(jnp.float32), axis=-1).max()


@functools.partial(jax.jit, static_argnums=0)
def mean_score(metric: Metric, x: Array, batch: Batch, state: Any) -> Array:
    """The run's score: the mean over prompts of `metric.score` (jitted per metric).

    Example:
        >>> metric = VectorAnchor(layer=1)
        >>> state = metric.prepare(cfg, base.params, donor.params, batch)
        >>> float(mean_score(metric, readout(cfg, donor.params, batch, 1), batch, state)) > 0
        True
    """
    return jnp.mean(metric.score(x, batch, state))


def save_anchor(path: str | os.PathLike[str], direction: Array, layer: int) -> None:
    """Writes an anchor direction to an `.npz` file (atomically), to share across runs.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.npz"
        >>> save_anchor(f, jnp.ones(4) / 2, 1)
        >>> np.load(f)["layer"].item()
        1
    """
    import io

    buffer = io.BytesIO()
    np.savez(buffer, direction=np.asarray(direction, np.float32), layer=np.int64(layer))
    atomic_write_bytes(path, buffer.getvalue())


def load_anchor(path: str | os.PathLike[str], config: ModelConfig, layer: int) -> Array:
    """Reads an anchor direction written by `save_anchor`, checking it fits the model.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.npz"
        >>> save_anchor(f, jnp.ones(cfg.d_model), 1)
        >>> round(float(jnp.linalg.norm(load_anchor(f, cfg, 1))), 6)  # returned at unit length
        1.0
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            direction, saved_layer = data["direction"], int(data["layer"])
    except FileNotFoundError:
        raise MetricError(f"{path}: anchor file not found") from None
    except (ValueError, KeyError, OSError) as e:
        raise MetricError(f"{path}: not an anchor file ({e})") from None
    if direction.shape != (config.d_model,):
        raise MetricError(f"{path}: anchor has shape {direction.shape}, the model needs "
                          f"({config.d_model},)")
    if saved_layer != layer:
        raise MetricError(f"{path}: anchor was fitted at layer {saved_layer}, not {layer}")
    norm = float(np.linalg.norm(direction))
    if not np.isfinite(norm) or norm == 0:
        raise MetricError(f"{path}: anchor direction has zero length or is not finite")
    return jnp.asarray(direction / norm)


@dataclasses.dataclass(frozen=True)
class LogitDiff(Metric):
    """`logit[target] - logit[foil]` at the last prompt position (targets from the prompts).

    Example:
        >>> LogitDiff().layer is None
        True
    """

    name: str = "logit-diff"

    def prepare(self, config: ModelConfig, base: Params, donor: Params, batch: Batch,
                readouts: tuple[Array, Array] | None = None) -> Any:
        if bool((batch.targets[:, 0] < 0).any() or (batch.foils[:, 0] < 0).any()):
            raise MetricError("logit-diff needs a 'target' and a 'foil' on every prompt line")
        return ()

    def score(self, x: Array, batch: Batch, state: Any) -> Array:
        first = x[:, 0]
        target = jnp.take_along_axis(first, batch.targets[:, :1], axis=-1)[:, 0]
        foil = jnp.take_along_axis(first, batch.foils[:, :1], axis=-1)[:, 0]
        return target - foil


@dataclasses.dataclass(frozen=True)
class KLDivergence(Metric):
    """`KL(donor || model)` of the next-token distribution at the readout positions (0 for the
    donor; recovery is then `1 - KL(patched) / KL(base)`).

    Example:
        >>> KLDivergence().name
        'kl'
    """

    name: str = "kl"
    state_per_prompt: bool = True

    def prepare(self, config: ModelConfig, base: Params, donor: Params, batch: Batch,
                readouts: tuple[Array, Array] | None = None) -> Array:
        x_donor = (readouts or endpoint_readouts(config, base, donor, batch, self.layer))[1]
        return jax.nn.log_softmax(x_donor, axis=-1)

    def score(self, x: Array, batch: Batch, state: Array) -> Array:
        logp = jax.nn.log_softmax(x, axis=-1)
        kl = jnp.sum(jnp.exp(state) * (state - logp), axis=-1)
        return _weighted(kl, batch)


@dataclasses.dataclass(frozen=True)
class LogProb(Metric):
    """The log-probability of each prompt's target tokens, teacher-forced (summed over them).

    Use with a batch built with `positions="targets"`.

    Example:
        >>> LogProb().name
        'logprob'
    """

    name: str = "logprob"

    def prepare(self, config: ModelConfig, base: Params, donor: Params, batch: Batch,
                readouts: tuple[Array, Array] | None = None) -> Any:
        if bool((batch.targets[:, 0] < 0).any()):
            raise MetricError("logprob needs a 'target' on every prompt line")
        return ()

    def score(self, x: Array, batch: Batch, state: Any) -> Array:
        logp = jax.nn.log_softmax(x, axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(batch.targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(batch.weights > 0, picked, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class CustomMetric(Metric):
    """Any function of the readout: `fn(x, batch) -> [P]` scores.

    Attributes:
        fn: the function (must be hashable: a module-level function, not a fresh lambda per
            call, for compiled sweeps to be reused).
        layer: read the residual stream after this block, or the logits when None.
        name: the metric's name in reports.

    Example:
        >>> m = CustomMetric(lambda x, b: x[:, 0, 0], layer=None, name="first-logit")
        >>> m.name
        'first-logit'
    """

    fn: Callable[[Array, Batch], Array] = dataclasses.field(default=lambda x, b: x.sum((1, 2)))
    layer: int | None = None
    name: str = "custom"

    def score(self, x: Array, batch: Batch, state: Any) -> Array:
        scores = self.fn(x, batch)
        if scores.shape != batch.tokens.shape[:1]:
            raise InvalidInputError(f"custom metric {self.name!r} must return one score per prompt "
                                    f"{batch.tokens.shape[:1]}, got shape {scores.shape}")
        return scores


def metric_from_name(name: str, anchor_layer: int | None = None,
                     anchor_path: str | None = None) -> Metric:
    """The metric the command line calls `name`.

    Example:
        >>> metric_from_name("anchor", 2)
        VectorAnchor(layer=2, path=None, name='anchor')
    """
    if name == "anchor":
        if anchor_layer is None:
            raise MetricError("the anchor metric needs an anchor layer")
        return VectorAnchor(layer=anchor_layer, path=anchor_path)
    metrics: dict[str, Metric] = {"logit-diff": LogitDiff(), "kl": KLDivergence(), "logprob": LogProb()}
    if name not in metrics:
        raise MetricError(f"unknown metric {name!r} (choose from anchor, {', '.join(metrics)})")
    return metrics[name]
