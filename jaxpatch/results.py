"""The result table shared by sweeps, attribution and activation patching, and its plumbing.

A `SweepResult` is one score per component, on one scale for every method: the raw metric
score of the patched model, its recovery (0 = base, 1 = donor) and its effect (how far the
patch moved the model it was applied to). Timing, finiteness checks and the serialized forms
live here so that every method fills and writes the table the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from jaxpatch.errors import NonFiniteError

__all__ = ["SweepResult", "ScoreMatrix", "Misranked", "misranked_to_dicts", "run_timing",
           "check_finite_scores"]


@dataclasses.dataclass(kw_only=True)
class SweepResult:
    """The scores of a sweep, in candidate order.

    Attributes:
        metric, direction, positions: what was measured and how.
        readout_layer: the block whose output the metric reads (None: the logits).
        base_score, donor_score: the unpatched models' scores (recovery 0 and 1).
        names: candidate names.
        scores: raw metric scores of the patched models.
        timing: wall_s (all), prepare_s (base/donor runs, anchor, caches), compile_s,
            sweep_s (the candidates, compilation excluded) and candidates_per_s over sweep_s.
        inputs: checkpoint and prompts fingerprints, versions, seeds.
        skipped: names of candidates after the anchor layer, reported without running.
        method: "exact" for sweeps, "activation" for activation patching, the attribution
            method for attribution tables.
        extra: method-specific details (e.g. integrated gradients' completeness gap).
        patch_at: the token positions the patches applied at ("everywhere", or a
            position-restricted patch's choice: `jaxpatch.prompts.patch_where`).

    Example:
        >>> r = SweepResult(metric="anchor", direction="denoise", readout_layer=1,
        ...                 positions="last", base_score=0.0, donor_score=2.0, names=["a"],
        ...                 scores=np.array([1.0]))
        >>> r.recovery.tolist()
        [0.5]
    """

    metric: str
    direction: str
    readout_layer: int | None
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
    patch_at: str = "everywhere"

    @property
    def recovery(self) -> np.ndarray:
        """`(score - base) / (donor - base)`: 0 at the base model, 1 at the donor."""
        return (self.scores - self.base_score) / (self.donor_score - self.base_score)

    @property
    def effect(self) -> np.ndarray:
        """How far the patch moved the score from the model it was applied to, in recovery
        units: `recovery` when denoising, `1 - recovery` otherwise (0 = no effect).

        Example:
            >>> r = SweepResult(metric="m", direction="noise", readout_layer=None, positions="last",
            ...                 base_score=0.0, donor_score=1.0, names=["a"], scores=np.array([0.25]))
            >>> r.effect.tolist()
            [0.75]
        """
        return self.recovery if self.direction == "denoise" else 1.0 - self.recovery

    def to_dict(self) -> dict[str, Any]:
        """The result as the `scores.json` document.

        Example:
            >>> SweepResult(metric="kl", direction="noise", readout_layer=None, positions="last",
            ...             base_score=1.0, donor_score=0.0, names=[], scores=np.zeros(0)).to_dict()["metric"]
            'kl'
        """
        return {
            "metric": self.metric, "direction": self.direction, "readout_layer": self.readout_layer,
            "positions": self.positions, "patch_at": self.patch_at, "base_score": self.base_score,
            "donor_score": self.donor_score,
            "components": [{"name": n, "score": float(s), "recovery": float(r), "effect": float(e)}
                           for n, s, r, e in zip(self.names, self.scores, self.recovery, self.effect)],
            "skipped": self.skipped, "method": self.method, "extra": self.extra,
            "timing": self.timing, "inputs": self.inputs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResult:
        """Rebuilds a result from `to_dict` output.

        Example:
            >>> r = SweepResult(metric="m", direction="denoise", readout_layer=2, positions="last",
            ...                 base_score=0.0, donor_score=1.0, names=["a"], scores=np.array([0.5]))
            >>> SweepResult.from_dict(r.to_dict()) == r
            True
        """
        comps = data["components"]
        layer = data["readout_layer"] if "readout_layer" in data else data["anchor_layer"]  # older files
        return cls(metric=data["metric"], direction=data["direction"], readout_layer=layer,
                   positions=data["positions"], base_score=data["base_score"],
                   donor_score=data["donor_score"], names=[c["name"] for c in comps],
                   scores=np.array([c["score"] for c in comps], np.float64),
                   timing=dict(data.get("timing", {})), inputs=dict(data.get("inputs", {})),
                   skipped=list(data.get("skipped", [])), method=data.get("method", "exact"),
                   extra=dict(data.get("extra", {})), patch_at=data.get("patch_at", "everywhere"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SweepResult):
            return NotImplemented
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        same_scores = np.array_equal(mine.pop("scores"), theirs.pop("scores"))
        return same_scores and mine == theirs

    def to_csv(self) -> str:
        """The scores as CSV (`name,score,recovery,effect`).

        Example:
            >>> r = SweepResult(metric="m", direction="denoise", readout_layer=None, positions="last",
            ...                 base_score=0.0, donor_score=2.0, names=["a"], scores=np.array([1.0]))
            >>> print(r.to_csv(), end="")
            name,score,recovery,effect
            a,1,0.5,0.5
        """
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "score", "recovery", "effect"])
        for n, s, r, e in zip(self.names, self.scores, self.recovery, self.effect):
            writer.writerow([n, f"{s:.9g}", f"{r:.9g}", f"{e:.9g}"])
        return out.getvalue()

    def top(self, k: int = 10, by: Literal["effect", "size"] = "effect") -> list[tuple[str, float]]:
        """The k candidates with the largest effect (or the largest |effect|, `by="size"`), as
        (name, effect).

        Example:
            >>> r = SweepResult(metric="m", direction="denoise", readout_layer=None, positions="last",
            ...                 base_score=0.0, donor_score=1.0, names=["a", "b"],
            ...                 scores=np.array([-1.5, 0.9]))
            >>> r.top(1), r.top(1, by="size")
            ([('b', 0.9)], [('a', -1.5)])
        """
        key = np.abs(self.effect) if by == "size" else self.effect
        order = np.argsort(-key, kind="stable")[:k]
        return [(self.names[i], float(self.effect[i])) for i in order]


@dataclasses.dataclass(kw_only=True)
class ScoreMatrix:
    """Candidates (rows) scored on every column of one metric (`sweep_matrix`): e.g. each
    supplier's patch read at every tracing target.

    Attributes:
        metric, direction, method: what was measured and how ("exact" or "activation").
        names: the rows (candidates), in order.
        columns: the columns (a `ComponentAnchor`'s targets).
        base_scores, donor_scores: `[columns]`, the unpatched models' scores.
        scores: `[rows, columns]` raw scores of the patched models.
        timing: as `SweepResult.timing`.

    Example:
        >>> m = ScoreMatrix(metric="anchor", direction="denoise", method="exact", names=["a"],
        ...                 columns=["t", "u"], base_scores=np.zeros(2),
        ...                 donor_scores=np.array([2.0, 4.0]), scores=np.array([[1.0, 1.0]]))
        >>> m.recovery.tolist(), m.column("u").tolist()
        ([[0.5, 0.25]], [0.25])
    """

    metric: str
    direction: str
    method: str
    names: list[str]
    columns: list[str]
    base_scores: np.ndarray
    donor_scores: np.ndarray
    scores: np.ndarray
    timing: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def recovery(self) -> np.ndarray:
        """`[rows, columns]`: each column normalized so the base is 0 and the donor 1."""
        return (self.scores - self.base_scores) / (self.donor_scores - self.base_scores)

    def column(self, name: str) -> np.ndarray:
        """One column's recovery, `[rows]`."""
        return self.recovery[:, self.columns.index(name)]


Misranked = tuple[str, int, int]
"""A component whose approximate rank was far from its exact rank: (name, approximate rank,
exact rank), ranks 1-based."""


def misranked_to_dicts(misranked: Sequence[Misranked]) -> list[dict[str, Any]]:
    """Misranked components as JSON records.

    Example:
        >>> misranked_to_dicts([("layers.0.mlp[neuron=3]", 1, 7)])
        [{'name': 'layers.0.mlp[neuron=3]', 'attribution_rank': 1, 'exact_rank': 7}]
    """
    return [{"name": n, "attribution_rank": a, "exact_rank": e} for n, a, e in misranked]


def run_timing(wall_start: float, prepare_s: float, compile_s: float,
               candidates: int) -> dict[str, float]:
    """A run's timing record: wall, preparation, compilation, the candidates' own time and
    their rate, measured up to now.

    Arguments:
        wall_start: `time.perf_counter()` when the run started.
        prepare_s, compile_s: seconds spent preparing and compiling.
        candidates: how many candidates were scored.

    Returns:
        `{"wall_s", "prepare_s", "compile_s", "sweep_s", "candidates_per_s"}`.

    Example:
        >>> t = run_timing(time.perf_counter() - 3.0, 1.0, 1.0, 10)
        >>> round(t["sweep_s"]), round(t["candidates_per_s"])
        (1, 10)
    """
    wall = time.perf_counter() - wall_start
    sweep_s = wall - prepare_s - compile_s
    return {"wall_s": wall, "prepare_s": prepare_s, "compile_s": compile_s, "sweep_s": sweep_s,
            "candidates_per_s": candidates / max(sweep_s, 1e-9)}


def check_finite_scores(names: Sequence[str], values: np.ndarray, what: str) -> None:
    """Refuses NaN or infinite scores, naming the first component that has one.

    Arguments:
        names: the components, in the order of `values`.
        values: their scores (`[n]`, or `[n, columns]`).
        what: what the scores are, for the message ("score", "attribution", ...).

    Raises:
        NonFiniteError: naming the first bad component and how many more there are.

    Example:
        >>> check_finite_scores(["a", "b"], np.array([1.0, np.nan]), "score")
        Traceback (most recent call last):
        ...
        jaxpatch.errors.NonFiniteError: the score of 'b' is NaN or Inf
    """
    finite = np.isfinite(np.asarray(values)).reshape(len(names), -1).all(axis=1)
    bad = np.flatnonzero(~finite)
    if len(bad):
        raise NonFiniteError(f"the {what} of {names[bad[0]]!r} is NaN or Inf"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
