"""A prepared pair: a base/donor pair and its prompts, checked once, placed once, with what
every scoring method reads from the two models computed once.

Every method (weight sweeps, activation patching, attribution, learned patches, the hierarchy)
runs on a `PreparedPair`. Preparing checks that base and donor are one architecture and places
the params and prompts on the pair's mesh; after that, the pair keeps, per model, what runs
reuse:

    prefix(model, layer)     the model's residual stream before each block up to `layer`, and
                             what a metric reading block `layer` (or the logits) sees: one pass
    stacked(model)           the model's blocks stacked (the one extra copy of params a sweep
                             holds; only the latest model's is kept)
    endpoints(metric)        the metric's prepared state and the base's and donor's scores
    sources(model, layer)    every activation site's value in a clean run (activation patching)

so a trace that runs a dozen sweeps on one pair and batch runs each model's prefix pass once
per readout layer, not once per sweep. `counts` says how many passes and preparations ran.
Prepared values live as long as the pair: build one pair per (models, prompts) and drop it to
free them.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, NamedTuple

import jax
from jax.sharding import Mesh

from jaxpatch._tree import without_layers
from jaxpatch.engine.programs import clean_sites, prefix_pass, stacked_checked
from jaxpatch.errors import InvalidInputError
from jaxpatch.mesh import MeshLike, make_mesh, place_prompts
from jaxpatch.metrics import Metric, metric_readout
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.model import Model
from jaxpatch.modes import PATCH_AT, PatchAt, Positions, check_mode
from jaxpatch.pair import check_pair, endpoint_scores, placed_on
from jaxpatch.prompts import Batch, patch_where

__all__ = ["PreparedPair", "MetricEndpoints", "prepare", "Which", "PROMPT_AXES"]

Which = Literal["base", "donor"]

PROMPT_AXES = ("candidates", "data")
"""Where methods without candidates (gradients, learned patches) split their prompts."""


class MetricEndpoints(NamedTuple):
    """A metric fitted to a pair.

    Attributes:
        state: the metric's prepared state (`Metric.prepare`).
        base_score, donor_score: recovery's 0 and 1 (floats, or `[width]` arrays).
        readouts: what the metric reads from the base and the donor, by model.
    """

    state: Any
    base_score: Any
    donor_score: Any
    readouts: Mapping[str, Any]


class PreparedPair:
    """A checked base/donor pair and its prompts, placed on a mesh, with cached prefix passes
    and metric endpoints (see the module docstring). Build it with `prepare`.

    Attributes:
        base, donor: the models (params placed on `mesh`).
        batch: the prompts (split along the mesh's `data` axis).
        config: the architecture.
        mesh: the device mesh, or None for one device.
        positions: the readout positions the batch was built with (recorded in results).
        patch_at: the token positions weight patches apply at (`jaxpatch.prompts.patch_where`;
            recorded in results).
        inputs: fingerprints of the inputs (recorded in results).
        counts: how many prefix passes, stackings, metric preparations and clean activation
            runs this pair has done.
    """

    def __init__(self, base: Model, donor: Model, batch: Batch, mesh: Mesh | None,
                 positions: Positions, inputs: Mapping[str, Any],
                 patch_at: PatchAt = "everywhere") -> None:
        check_pair(base, donor)
        check_mode("patch positions", patch_at, PATCH_AT, InvalidInputError)
        self.mesh = mesh
        self.base, self.donor, self.batch = placed_on(mesh, base, donor, batch)
        self.config: ModelConfig = base.config
        self.positions = positions
        self.patch_at: PatchAt = patch_at
        self.inputs = dict(inputs)
        self.counts = {"prefix_passes": 0, "stackings": 0, "metric_preparations": 0,
                       "source_runs": 0}
        self._prefix: dict[tuple[str, int | None], tuple[Any, jax.Array]] = {}
        self._stacked: tuple[str, Params] | None = None
        self._endpoints: dict[Metric, MetricEndpoints] = {}
        self._judged: dict[Any, tuple[float, float]] = {}
        self._sources: dict[tuple[str, int | None], dict[str, jax.Array]] = {}
        self._batches: dict[tuple[str, ...], Batch] = {}

    def model(self, which: Which) -> Model:
        """The base or the donor.

        Example:
            >>> pair.model("donor") is pair.donor
            True
        """
        return self.base if which == "base" else self.donor

    @property
    def patch_where(self) -> jax.Array | None:
        """Where weight patches apply on the pair's prompts (`MixedWeight.where`, float
        `[P, S]`), or None when they apply everywhere.

        Example:
            >>> pair.patch_where is None
            True
        """
        return patch_where(self.batch.roles, self.patch_at)

    def require_patches_everywhere(self, method: str) -> None:
        """Refuses a method that cannot restrict its patches to positions (attribution,
        activation patching, the learned patch) on a pair prepared with `patch_at`.

        Example:
            >>> pair.require_patches_everywhere("attribution")  # a pair patching everywhere
        """
        if self.patch_at != "everywhere":
            raise InvalidInputError(f"{method} patches weights at every position, but this pair "
                                    f"restricts patches to the {self.patch_at!r} positions; prepare "
                                    "it with patch_at='everywhere' (sweeps and faithfulness curves "
                                    "take position-restricted patches)")

    def which(self, params: Params) -> Which | None:
        """Whether `params` is the base's or the donor's own tree (None: another tree).

        Example:
            >>> pair.which(pair.base.params), pair.which({})
            ('base', None)
        """
        if params is self.base.params:
            return "base"
        return "donor" if params is self.donor.params else None

    def batch_along(self, axes: tuple[str, ...]) -> Batch:
        """The prompts split along these mesh axes (methods without candidates split their
        prompts along `candidates` too); without a mesh, the batch itself.

        Example:
            >>> pair.batch_along(PROMPT_AXES) is pair.batch  # one device
            True
        """
        if self.mesh is None or axes == ("data",):
            return self.batch
        if axes not in self._batches:
            self._batches[axes] = place_prompts(self.mesh, self.batch,
                                                self.batch.tokens.shape[0], axes)
        return self._batches[axes]

    def stacked(self, which: Which) -> Params:
        """The model's blocks stacked, NaN and Inf refused (only the latest model's kept).

        Example:
            >>> pair.stacked("base")["mlp"]["up_proj"]["weight"].shape  # [blocks, d_model, d_ff]
            (2, 32, 64)
        """
        if self._stacked is None or self._stacked[0] != which:
            self._stacked = None  # one stacked copy alive at a time
            self.counts["stackings"] += 1
            self._stacked = (which, stacked_checked(self.model(which).params, which))
        return self._stacked[1]

    def prefix(self, which: Which, layer: int | None) -> tuple[Any, jax.Array]:
        """One pass of a model up to block `layer` (None: through the last block).

        Returns:
            `(readout, residuals)`: what a metric reading block `layer` (or the logits) sees,
            and the residual streams before blocks 0 .. layer (and after the last, for None).

        Example:
            >>> readout, residuals = pair.prefix("donor", 1)
            >>> residuals.shape, pair.prefix("donor", 1)[1] is residuals  # computed once
            ((2, 3, 5, 32), True)
        """
        key = (which, layer)
        if key not in self._prefix:
            last = self.config.n_layers - 1 if layer is None else layer
            count = last + 2 if layer is None else last + 1
            params = self.model(which).params
            self._prefix[key] = prefix_pass(self.config, self.stacked(which),
                                            without_layers(params), self.batch, layer, count)
            self.counts["prefix_passes"] += 1
        return self._prefix[key]

    def readout(self, which: Which, metric: Metric) -> Any:
        """What `metric` reads from a model: the prefix pass's readout, or for a metric that
        reads component outputs, a plain run's.

        Example:
            >>> pair.readout("base", jaxpatch.VectorAnchor(layer=1)).shape  # [prompts, positions, d]
            (3, 1, 32)
        """
        return self.endpoints(metric).readouts[which]

    def endpoints(self, metric: Metric) -> MetricEndpoints:
        """The metric checked against the architecture, fitted to the pair, and both models
        scored (once per metric).

        Raises:
            MetricError: the metric does not fit, or base and donor score the same.
            NonFiniteError: a score is NaN or infinite.

        Example:
            >>> ends = pair.endpoints(jaxpatch.KLDivergence())
            >>> ends.donor_score < ends.base_score  # KL(donor || model): 0 at the donor
            True
        """
        if metric not in self._endpoints:
            metric.check(self.config)
            if metric.outputs(self.config):  # read inside blocks: a plain run serves
                readouts = {w: metric_readout(self.config, metric, self.model(w).params,
                                              self.batch) for w in ("base", "donor")}
            else:
                readouts = {w: self.prefix(w, metric.layer)[0] for w in ("base", "donor")}
            state, base_score, donor_score = endpoint_scores(
                self.config, self.base, self.donor, self.batch, metric,
                (readouts["base"], readouts["donor"]))
            self.counts["metric_preparations"] += 1
            self._endpoints[metric] = MetricEndpoints(state, base_score, donor_score, readouts)
        return self._endpoints[metric]

    def judged_endpoints(self, judge: Any,
                         score: Callable[[], tuple[float, float]]) -> tuple[float, float]:
        """A text judge's raw scores of the base and the donor (`TextJudge.endpoints`): `score()`
        the first time this judge asks, the recorded pair after (they depend on no patch).

        Example:
            >>> pair.judged_endpoints("judge", lambda: (0.0, 1.0))
            (0.0, 1.0)
            >>> pair.judged_endpoints("judge", lambda: (5.0, 5.0))  # recorded: not called again
            (0.0, 1.0)
        """
        if judge not in self._judged:
            self._judged[judge] = score()
        return self._judged[judge]

    def sources(self, which: Which, layer: int | None) -> dict[str, jax.Array]:
        """Every activation site's value in a clean run of a model up to block `layer`.

        Example:
            >>> pair.sources("donor", None)["layers.1.mlp.neurons"].shape
            (3, 5, 64)
        """
        key = (which, layer)
        if key not in self._sources:
            self._sources[key] = clean_sites(self.config, self.model(which).params, self.batch,
                                             layer)
            self.counts["source_runs"] += 1
        return self._sources[key]

    def __repr__(self) -> str:
        devices = "1 device" if self.mesh is None else f"mesh {dict(self.mesh.shape)}"
        where = "" if self.patch_at == "everywhere" else f", patches at {self.patch_at}"
        return (f"PreparedPair({self.config.family}, {self.batch.tokens.shape[0]} prompts of "
                f"{self.batch.tokens.shape[1]} tokens, {devices}{where})")


def prepare(base: Model, donor: Model, batch: Batch, *, mesh: MeshLike | None = None,
            positions: Positions = "last", inputs: Mapping[str, Any] | None = None,
            patch_at: PatchAt = "everywhere") -> PreparedPair:
    """Checks a base/donor pair and places it and its prompts for every method to run on.

    Arguments:
        base: the base model.
        donor: the behavior-specialized model (same architecture).
        batch: prompts and readout positions (`jaxpatch.make_batch`).
        mesh: devices to split the work over (`jaxpatch.mesh`: a `Mesh`,
            `{"candidates": 4, "model": 2}` or `"candidates=4,model=2"`); None: one device.
        positions: the readout positions `batch` was built with (recorded in results).
        inputs: fingerprints of the inputs (recorded in results).
        patch_at: where weight patches apply: "everywhere", or only at some token positions
            ("prompt", "response", "first-response", "marked": `jaxpatch.prompts.patch_where`),
            for sweeps and faithfulness curves (Dynamic Weight Grafting's question: which
            positions need the donor's weights).

    Returns:
        A `PreparedPair`.

    Raises:
        PatchError, JaxpatchError: base and donor are not one architecture (naming the first
            tensor or setting that differs); a bad mesh.

    Example:
        >>> pair = prepare(base, donor, batch)
        >>> pair
        PreparedPair(llama, 3 prompts of 5 tokens, 1 device)
        >>> r1 = jaxpatch.sweep(pair, jaxpatch.VectorAnchor(layer=1))
        >>> r2 = jaxpatch.sweep(pair, jaxpatch.VectorAnchor(layer=1), direction="noise")
        >>> pair.counts["prefix_passes"]  # each model's pass ran once, for both sweeps
        2
    """
    return PreparedPair(base, donor, batch, make_mesh(mesh), positions, dict(inputs or {}),
                        patch_at)



