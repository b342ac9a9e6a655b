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

from jaxpatch.components import as_selector, component_sites, components
from jaxpatch.errors import InvalidInputError, MetricError, SelectorError
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import Edit, forward
from jaxpatch.prompts import Batch
from jaxpatch.rounding import jit
from jaxpatch.runs.atomic import atomic_write_bytes

__all__ = ["readout", "endpoint_readouts", "read_metric", "metric_readout", "metric_endpoints",
           "Metric", "VectorAnchor", "anchor_direction", "ComponentAnchor", "target_sites",
           "component_output", "mean_score", "save_anchor", "load_anchor", "LogitDiff",
           "KLDivergence", "LogProb", "CustomMetric", "metric_from_name"]

Array = jax.Array
Readout = Any
"""What a metric reads: an array, or a dict of component output name -> array."""
OutputSites = tuple[tuple[str, "tuple[int, ...] | None"], ...]
"""Where a component output is read: (activation site, indices on its component axis or None
for all), in order."""


@functools.partial(jit, static_argnums=(0, 3))
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


def read_metric(config: ModelConfig, metric: Metric, params: Params, batch: Batch, *,
                start_layer: int = 0, residual: Array | None = None, edit: Edit | None = None,
                full_sequence: bool = False, remat: bool = False,
                earlier: Readout | None = None) -> Readout:
    """What `metric` reads from a run of `params` (traceable; jit it with the config and
    metric static).

    The residual after the anchor block or the logits at the readout positions; for a metric
    that reads component outputs (`Metric.outputs`), those outputs at the readout positions,
    by name.

    Arguments:
        config, metric, params, batch: the run.
        start_layer, residual: start at this block from this residual stream (see `forward`).
        edit: an activation edit applied before the metric reads a site.
        full_sequence: run the last block on every position (as an `edit` that replaces
            values with full-sequence ones needs) and gather the readout positions after.
        remat: recompute block activations in the backward pass (residual readouts only).
        earlier: with `start_layer`, an unpatched run's readout of the component outputs the
            run no longer reaches (those of blocks before `start_layer`): the run cannot change
            them.

    Returns:
        An array, or a dict of output name -> `[P, Q, n]` arrays.

    Example:
        >>> read_metric(cfg, VectorAnchor(layer=1), base.params, batch).shape
        (3, 1, 32)
    """
    outputs = metric.outputs(config)
    if not outputs:
        positions = None if full_sequence else batch.positions
        x = forward(config, params, batch.tokens, batch.mask, start_layer=start_layer,
                    residual=residual, stop_layer=metric.layer, readout_positions=positions,
                    remat=remat, edit=edit).read(metric.layer)
        return x if positions is not None else _gather(x, batch.positions)
    if remat:
        raise MetricError(f"the {metric.name} metric reads activations inside blocks: run it "
                          "without remat")
    wanted = {site for sites in outputs.values() for site, _ in sites}
    store: dict[str, Array] = {}

    def record(site: str, value: Array) -> Array:
        value = edit(site, value) if edit is not None else value
        if site in wanted:
            store[site] = value
        return value

    forward(config, params, batch.tokens, batch.mask, start_layer=start_layer, residual=residual,
            stop_layer=metric.layer, edit=record)
    out = {}
    for name, sites in outputs.items():
        if all(site in store for site, _ in sites):
            out[name] = component_output({s: _gather(store[s], batch.positions) for s, _ in sites},
                                         sites)
        elif earlier is not None:
            out[name] = earlier[name]
        else:
            raise ValueError(f"{name} lies before block {start_layer}: pass `earlier`")
    return out


def component_output(values: dict[str, Array], sites: OutputSites) -> Array:
    """A component's output `[P, Q, n]` from its sites' values (`[P, Q, ...]`, by site): each
    site's indexed heads (axis 2 of `[P, Q, heads, head_dim]`) or neurons (the last axis of
    `[P, Q, d_ff]`), flattened and concatenated.

    Example:
        >>> heads = jnp.arange(12.0).reshape(1, 1, 3, 4)
        >>> component_output({"layers.0.self_attn.heads": heads},
        ...                  (("layers.0.self_attn.heads", (2,)),)).tolist()
        [[[8.0, 9.0, 10.0, 11.0]]]
    """
    parts = []
    for site, index in sites:
        value = values[site].astype(jnp.float32)
        if index is not None:
            value = value[:, :, np.asarray(index)]
        parts.append(value.reshape(*value.shape[:2], -1))
    return jnp.concatenate(parts, axis=-1)


def _gather(x: Array, positions: Array) -> Array:
    """`x[p, positions[p, q], ...]`: a `[P, S, ...]` value at the readout positions."""
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


@functools.partial(jit, static_argnums=(0, 1))
def metric_readout(config: ModelConfig, metric: Metric, params: Params, batch: Batch) -> Readout:
    """`read_metric` of a plain run, jitted.

    Example:
        >>> metric_readout(cfg, LogProb(), base.params, batch).shape
        (3, 1, 128)
    """
    return read_metric(config, metric, params, batch)


def metric_endpoints(config: ModelConfig, metric: Metric, base: Params,
                     donor: Params, batch: Batch) -> tuple[Readout, Readout]:
    """The base's and the donor's readouts for `metric` (`metric_readout`).

    Example:
        >>> x_base, x_donor = metric_endpoints(cfg, LogProb(), base.params, donor.params, batch)
        >>> x_base.shape
        (3, 1, 128)
    """
    return metric_readout(config, metric, base, batch), metric_readout(config, metric, donor, batch)


class Metric:
    """Base class: `layer` (None for logits), `prepare` and `score`."""

    name: str = "metric"
    layer: int | None = None
    state_per_prompt: bool = False  # the state has a leading prompt axis (sliced with the batch)
    width: int = 1  # scores per prompt: `score` returns `[P]`, or `[P, width]` when above 1

    def outputs(self, config: ModelConfig) -> dict[str, OutputSites]:
        """The component outputs the metric reads instead of the residual stream or the
        logits, by name, each as the activation sites it is read from (`component_output`);
        empty for metrics that read the residual stream or the logits."""
        return {}

    def columns(self) -> tuple[str, ...]:
        """The names of the score's columns (`width` of them): the metric's name by default."""
        return (self.name,) * self.width

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
        """Per-prompt scores `[P]` (or `[P, width]`) from a readout `x` (`[P, Q, d_model]` or
        `[P, Q, vocab]`; for a metric with `outputs`, a dict of name -> `[P, Q, n]`)."""
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
        >>> b = Batch(ones, ones, ones, ones, ones, ones, ones)
        >>> anchor_direction(jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 2)), b, 0).tolist()
        [0.7071067690849304, 0.7071067690849304]
    """
    v, length, scale = (np.asarray(a) for a in _mean_difference(h_base, h_donor, batch.weights))
    length, scale = float(length), float(scale) or 1.0
    if not np.isfinite(length) or length <= 1e-7 * scale:
        raise MetricError(f"the anchor direction at layer {layer} has zero length: donor and base "
                          "do not differ there on these prompts; choose another layer or prompts")
    return jnp.asarray(v / length)


@jit
def _mean_difference(h_base: Array, h_donor: Array, weights: Array) -> tuple[Array, Array, Array]:
    """The mean over prompts of the weighted donor-minus-base difference, its length, and the
    largest base residual norm (to judge the length against)."""
    diff = (h_donor.astype(jnp.float32) - h_base.astype(jnp.float32)) * weights[..., None]
    v = diff.sum(axis=1).mean(axis=0)
    return v, jnp.linalg.norm(v), jnp.linalg.norm(h_base.astype(jnp.float32), axis=-1).max()


@functools.partial(jit, static_argnums=0)
def mean_score(metric: Metric, x: Array, batch: Batch, state: Any) -> Array:
    """The run's score: the mean over prompts of `metric.score` (jitted per metric).

    Example:
        >>> metric = VectorAnchor(layer=1)
        >>> state = metric.prepare(cfg, base.params, donor.params, batch)
        >>> float(mean_score(metric, readout(cfg, donor.params, batch, 1), batch, state)) > 0
        True
    """
    return jnp.mean(metric.score(x, batch, state), axis=0)


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
    except (ValueError, KeyError, OSError, TypeError, MemoryError) as e:
        raise MetricError(f"{path}: not an anchor file ({type(e).__name__}: {e})") from None
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
class ComponentAnchor(Metric):
    """The vector anchor read at components' outputs instead of the residual stream.

    For each target T: `v_T` = the mean over prompts and readout positions of T's output in
    the donor run minus T's output in the base run; a run's score for T is the mean over
    prompts of the projection of T's output on `v_T / |v_T|` (summed over the readout
    positions with their weights, as `VectorAnchor` does). Recovery then puts the base's
    output at 0 and the donor's at 1.

    What a target outputs (the sites of `jaxpatch.components.component_sites`):

        module   its own output: `layers.i.self_attn.q_proj` the queries, a norm the normalized
                 stream, `norm` the final normalized stream, `lm_head` the logits;
                 `layers.i.self_attn` and `layers.i.mlp` name what attention and the MLP add
                 to the residual stream (the outputs of o_proj and down_proj)
        head     `[head=h]` head h's output before o_proj; `[kv_head=g]` its keys and values
        neuron   `[neuron=...]` the activations entering down_proj

    A target may name several heads or neurons of one module (`layers.3.mlp[neuron=0-63]`);
    their outputs are read together as one vector.

    With one target the metric scores `[P]` like any metric (usable by `sweep`, `attribute`,
    `activation_patching`); with K targets it scores `[P, K]`, one column per target, which
    is how supplier -> target tracing reads every target from one run.

    Attributes:
        targets: a target name, or a tuple of them.
        name: the metric's name in reports.

    Example:
        >>> metric = ComponentAnchor("layers.1.self_attn")
        >>> metric.layer, metric.outputs(cfg)
        (1, {'layers.1.self_attn': (('layers.1.self_attn.o_proj', None),)})
        >>> state, base_score, donor_score = jaxpatch.endpoint_scores(cfg, base, donor, batch, metric)
        >>> donor_score > base_score
        True
    """

    targets: tuple[str, ...] | str = ()
    name: str = "component-anchor"

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise MetricError("a component anchor needs at least one target")
        object.__setattr__(self, "targets", targets)

    @property
    def width(self) -> int:  # type: ignore[override]
        return len(self.targets)

    @property
    def layer(self) -> int | None:  # type: ignore[override]
        """The last block the run needs (None: a target reads the final norm or logits)."""
        blocks = []
        for target in self.targets:
            head = target.split("[")[0].split(".")
            if head[0] in ("norm", "lm_head"):
                return None
            blocks.append(int(head[1]) if head[0] == "layers" and head[1:2] and head[1].isdigit()
                          else 0)
        return max(blocks)

    def check(self, config: ModelConfig) -> None:
        for target in self.targets:
            target_sites(config, target)
        super().check(config)

    def outputs(self, config: ModelConfig) -> dict[str, OutputSites]:
        return {target: target_sites(config, target) for target in self.targets}

    def columns(self) -> tuple[str, ...]:
        return tuple(self.targets)

    def prepare(self, config: ModelConfig, base: Params, donor: Params, batch: Batch,
                readouts: tuple[Array, Array] | None = None) -> tuple[Array, ...]:
        self.check(config)
        x_base, x_donor = readouts or metric_endpoints(config, self, base, donor, batch)
        directions = []
        for target in self.targets:
            v, length, scale = (np.asarray(a) for a in _mean_difference(
                x_base[target], x_donor[target], batch.weights))
            if not np.isfinite(float(length)) or float(length) <= 1e-7 * (float(scale) or 1.0):
                raise MetricError(f"the output of {target} does not differ between base and donor "
                                  "on these prompts: it has no anchor direction")
            directions.append(jnp.asarray(v / float(length)))
        return tuple(directions)

    def score(self, x: dict[str, Array], batch: Batch, state: tuple[Array, ...]) -> Array:
        columns = [_weighted(jnp.einsum("pqn,n->pq", x[t], v), batch)
                   for t, v in zip(self.targets, state)]
        return columns[0] if len(columns) == 1 else jnp.stack(columns, axis=-1)


_ALIASES = {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}


@functools.lru_cache(maxsize=1024)
def target_sites(config: ModelConfig, target: str) -> OutputSites:
    """Where a component anchor target's output is read: its activation sites and indices.

    Arguments:
        config: the architecture.
        target: a component name (any granularity but layer), `layers.i.self_attn` or
            `layers.i.mlp`, or a selector naming heads or neurons of one module.

    Returns:
        `((site, indices or None), ...)`.

    Raises:
        SelectorError: the target does not parse, names nothing, or spans several modules.

    Example:
        >>> target_sites(cfg, "layers.1.mlp[neuron=0-2]")
        (('layers.1.mlp.neurons', (0, 1, 2)),)
        >>> target_sites(cfg, "layers.0.self_attn[kv_head=1]")
        (('layers.0.self_attn.k_proj', (1,)), ('layers.0.self_attn.v_proj', (1,)))
    """
    parts = target.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _ALIASES:
        parts[2] = _ALIASES[parts[2]]
    selector = as_selector(".".join(parts))
    for granularity in ("module", "head", "neuron"):
        found = [c for c in components(config, granularity) if selector.matches(c)]
        if found:
            break
    else:
        raise SelectorError(f"target {target!r} names no module, head or neuron of this model")
    if granularity == "module" and len(found) > 1:
        raise SelectorError(f"target {target!r} names {len(found)} modules: name one module "
                            "(e.g. layers.0.mlp), or heads or neurons of one module")
    if len({c.path for c in found}) > 1:
        raise SelectorError(f"target {target!r} spans several modules: a target's heads or "
                            "neurons lie in one module")
    sites: dict[str, list[int] | None] = {}
    for component in found:
        for site, index in component_sites(config, component).items():
            current = sites.setdefault(site, [] if index is not None else None)
            if current is not None and index is not None:
                current.append(index)
    return tuple((site, None if index is None else tuple(index)) for site, index in sites.items())


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
