"""Faithfulness curves: how much of the behavior the top k components of a ranking carry.

For a ranking of components (by any method: exact patching, gradients, activation patching,
|dW|, random) and a direction, the set C_k of the top k components is patched as one patch and
scored exactly (one batched sweep over every k of every ranking, a set that several rankings
share scored once: `faithfulness_curves`):

    denoise   C_k's donor weights into the base:   f(k) = (m(C_k) - m(base)) / (m(donor) - m(base))
    noise     C_k's base weights into the donor:   f(k) = (m(C_k) - m(donor)) / (m(base) - m(donor))

so f(0) = 0 and f = 1 when the patch moves the whole model (MIB, Mueller et al. 2025: f is the
share of the full model's behavior the set recovers, or destroys). Summaries over x = k / n (n
the number of ranked components), by the trapezoidal rule over the measured sizes (k = 0
included):

    CPR   the area under f (higher: the top of the ranking carries the behavior sooner)
    CMD   the area between f and 1, |1 - f| (lower: closer to the whole model sooner)

Both depend on the sizes measured (recorded with the curve); compare rankings on one ladder.
A set (a learned patch, the hierarchy's sources) is one point (|set|, f), scored the same way
(`set_points`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from jaxpatch.components import select
from jaxpatch.engine import PreparedPair, sweep
from jaxpatch.errors import InvalidInputError
from jaxpatch.metrics import Metric
from jaxpatch.modes import PAIR_DIRECTIONS, Granularity, PairDirection, check_mode
from jaxpatch.patch import Patch
from jaxpatch.results import SweepResult
from jaxpatch.runs.settings import Execution, execution_of
from jaxpatch.verifiers import TextJudge

__all__ = ["FaithfulnessCurve", "faithfulness_curve", "faithfulness_curves", "ranking",
           "size_ladder", "set_points", "area"]

RankBy = Literal["effect", "size"]


@dataclasses.dataclass(kw_only=True)
class FaithfulnessCurve:
    """f(k) for the top k components of a ranking, with its summaries.

    Attributes:
        label: what was ranked (a method's name).
        direction: "denoise" or "noise".
        order: the ranked components, best first (all n of them).
        sizes: the k measured, ascending, 0 first.
        faithfulness: f(k) at each size.

    Example:
        >>> c = FaithfulnessCurve(label="x", direction="denoise", order=["a", "b", "c", "d"],
        ...                       sizes=[0, 1, 2, 4], faithfulness=np.array([0.0, 0.5, 0.5, 1.0]))
        >>> c.cpr, c.cmd
        (0.5625, 0.4375)
    """

    label: str
    direction: str
    order: list[str]
    sizes: list[int]
    faithfulness: np.ndarray

    @property
    def fractions(self) -> np.ndarray:
        """x = k / n at each measured size."""
        return np.asarray(self.sizes, np.float64) / len(self.order)

    @property
    def cpr(self) -> float:
        """The area under f over x = k / n (the trapezoidal rule over the measured sizes)."""
        return area(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        """The area between f and 1 over x = k / n."""
        return area(self.fractions, np.abs(1.0 - self.faithfulness))

    def at(self, k: int) -> float:
        """f at a measured size k.

        Example:
            >>> FaithfulnessCurve(label="x", direction="noise", order=["a", "b"], sizes=[0, 2],
            ...                   faithfulness=np.array([0.0, 0.9])).at(2)
            0.9
        """
        if k not in self.sizes:
            raise InvalidInputError(f"k = {k} was not measured (sizes: {self.sizes})")
        return float(self.faithfulness[self.sizes.index(k)])

    def to_dict(self) -> dict[str, Any]:
        """The curve as JSON data (with CPR and CMD).

        Example:
            >>> c = FaithfulnessCurve(label="x", direction="denoise", order=["a"], sizes=[0, 1],
            ...                       faithfulness=np.array([0.0, 1.0]))
            >>> c.to_dict()["cpr"], c.to_dict()["cmd"]
            (0.5, 0.5)
        """
        return {"label": self.label, "direction": self.direction, "components": len(self.order),
                "sizes": list(self.sizes), "faithfulness": [float(f) for f in self.faithfulness],
                "cpr": self.cpr, "cmd": self.cmd, "order": list(self.order)}


def area(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """The trapezoidal area under the points (x, y), x ascending.

    Example:
        >>> area([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
        0.75
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def size_ladder(n: int) -> list[int]:
    """The default sizes: 0, then 1, 2, 4, ... (doubling) and n itself.

    Example:
        >>> size_ladder(39)
        [0, 1, 2, 4, 8, 16, 32, 39]
    """
    sizes, k = [0], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return sizes + [n] if n > 0 else sizes


def ranking(result: SweepResult | Mapping[str, float], by: RankBy = "effect") -> list[str]:
    """Component names ranked best first: by the signed effect (a method's claim that the
    component moves the behavior the right way) or by its size (|effect|, any strong effect).
    Ties keep the components' order.

    Arguments:
        result: a score table (`sweep`, `attribute`, `activation_patching`), or names to
            importances (|dW|, a learned patch's gate probabilities).
        by: "effect" or "size".

    Returns:
        The names, best first.

    Example:
        >>> ranking({"a": 0.1, "b": -0.9, "c": 0.5}), ranking({"a": 0.1, "b": -0.9, "c": 0.5}, "size")
        (['c', 'a', 'b'], ['b', 'c', 'a'])
    """
    if isinstance(result, SweepResult):
        names, values = list(result.names), np.asarray(result.effect, np.float64)
    else:
        names, values = list(result), np.asarray(list(result.values()), np.float64)
    key = np.abs(values) if by == "size" else values
    return [names[i] for i in np.argsort(-key, kind="stable")]


def faithfulness_curves(pair: PreparedPair, metric: Metric | TextJudge,
                        rankings: Mapping[str, Sequence[str]], *,
                        granularity: Granularity = "module", direction: PairDirection = "denoise",
                        sizes: Sequence[int] | None = None, whole: float | None = None,
                        execution: Execution | None = None) -> dict[str, FaithfulnessCurve]:
    """The faithfulness curves of several rankings: each one's top k components patched
    together, for each k; a set that several rankings share (every ranking's top n, a common
    top 1) is scored once, and every set in one sweep.

    Arguments:
        pair: the base/donor pair and prompts (`jaxpatch.prepare`).
        metric: the behavior: a metric of one forward pass, or a `TextJudge` (what the patched
            models write, judged by a verifier; normalized between the base's and the donor's
            own generations, generated once for all the curves).
        rankings: a label per ranking: component names of one granularity, best first
            (`ranking`); the rest of the granularity's components may be left out (n is the
            length of a ranking).
        granularity: the components' granularity.
        direction: "denoise" (top k from the donor into the base) or "noise" (top k from the
            base into the donor).
        sizes: the k to measure (default `size_ladder(n)`); 0 and n are added when missing,
            so the summaries cover x = 0..1.
        whole: f of every component of the granularity together, where the caller has
            measured it already (`set_points`): a ranking's top n that is the whole
            granularity takes it instead of being scored again.
        execution: as for `sweep`.

    Returns:
        label -> `FaithfulnessCurve`, in the order of `rankings`.

    Raises:
        InvalidInputError: an unknown or repeated name, or a size outside 0..n.

    Example:
        >>> exact = jaxpatch.sweep(pair, jaxpatch.VectorAnchor(layer=1))
        >>> curves = faithfulness_curves(pair, jaxpatch.VectorAnchor(layer=1),
        ...                              {"exact": ranking(exact), "reversed": ranking(exact)[::-1]})
        >>> [round(c.at(len(c.order)), 4) for c in curves.values()]
        [1.0, 1.0]
    """
    check_mode("faithfulness direction", direction, PAIR_DIRECTIONS, InvalidInputError)
    by_name = {c.name: c for c in select(pair.config, None, granularity)}
    ladders: dict[str, list[int]] = {}
    patches: dict[frozenset[str], Patch] = {}
    effects: dict[frozenset[str], float] = {} if whole is None else {frozenset(by_name): whole}
    for label, order in rankings.items():
        unknown = [n for n in order if n not in by_name]
        if unknown:
            raise InvalidInputError(f"{unknown[0]!r} is not a {granularity} component of this model"
                                    f" (ranking {label!r})")
        if len(set(order)) != len(order):
            raise InvalidInputError(f"the ranking {label!r} names a component twice")
        n = len(order)
        ks = sorted(set(size_ladder(n) if sizes is None else [0, *sizes, n]))
        if ks[0] < 0 or ks[-1] > n:
            raise InvalidInputError(f"sizes must lie in 0..{n} (the length of ranking {label!r}),"
                                    f" got {ks}")
        ladders[label] = ks
        for k in ks[1:]:
            key = frozenset(order[:k])
            if key not in patches and key not in effects:
                patches[key] = Patch.from_components(pair.config, [by_name[x] for x in order[:k]],
                                                     label=f"set {len(patches)}")
    if patches:
        scored = _effects(pair, metric, {p.label: p for p in patches.values()}, direction,
                          execution)
        effects.update(zip(patches, scored))
    return {label: FaithfulnessCurve(  # the empty set is the start model itself: f(0) = 0
        label=label, direction=direction, order=list(order), sizes=ladders[label],
        faithfulness=np.asarray([0.0] + [effects[frozenset(order[:k])] for k in ladders[label][1:]],
                                np.float64))
        for label, order in rankings.items()}


def faithfulness_curve(pair: PreparedPair, metric: Metric | TextJudge, order: Sequence[str], *,
                       granularity: Granularity = "module", direction: PairDirection = "denoise",
                       sizes: Sequence[int] | None = None, label: str = "ranking",
                       execution: Execution | None = None) -> FaithfulnessCurve:
    """The faithfulness curve of one ranking (`faithfulness_curves` with one ranking).

    Arguments:
        pair, metric, granularity, direction, sizes, execution: as for `faithfulness_curves`.
        order: component names of one granularity, best first (`ranking`).
        label: the curve's name.

    Returns:
        A `FaithfulnessCurve`.

    Raises:
        InvalidInputError: an unknown or repeated name, or a size outside 0..n.

    Example:
        >>> exact = jaxpatch.sweep(pair, jaxpatch.VectorAnchor(layer=1))
        >>> curve = faithfulness_curve(pair, jaxpatch.VectorAnchor(layer=1), ranking(exact))
        >>> curve.sizes[:3], curve.at(0), round(curve.at(len(curve.order)), 4)
        ([0, 1, 2], 0.0, 1.0)
    """
    return faithfulness_curves(pair, metric, {label: order}, granularity=granularity,
                               direction=direction, sizes=sizes, execution=execution)[label]


def _effects(pair: PreparedPair, metric: Metric | TextJudge, patches: dict[str, Patch],
             direction: PairDirection, execution: Execution | None) -> list[float]:
    """Each patch's effect on the behavior (0: the start model, 1: the other model)."""
    if isinstance(metric, TextJudge):
        settings = execution_of(execution)
        base_score, donor_score = metric.endpoints(pair, execution=settings.sub("endpoints"))
        start, end = (base_score, donor_score) if direction == "denoise" else (donor_score, base_score)
        raw = metric.scores(pair, patches, direction=direction, execution=settings.sub("sets"))
        return [(raw[name] - start) / (end - start) for name in patches]
    scored = sweep(pair, metric, candidates=patches, direction=direction, execution=execution)
    return [float(e) for e in scored.effect]


def set_points(pair: PreparedPair, metric: Metric | TextJudge, sets: Mapping[str, Sequence[str]], *,
               granularity: Granularity = "module", direction: PairDirection = "denoise",
               execution: Execution | None = None) -> dict[str, tuple[int, float]]:
    """Sets of components (a learned patch at several sparsities, the hierarchy's sources)
    scored as points of a faithfulness plot: (size, f), in one sweep.

    Arguments:
        pair, metric, granularity, direction, execution: as for `faithfulness`.
        sets: a label per set of component names.

    Returns:
        label -> (number of components, f).

    Example:
        >>> points = set_points(pair, jaxpatch.VectorAnchor(layer=1),
        ...                     {"mlp 0": ["layers.0.mlp.up_proj"]})
        >>> points["mlp 0"][0], round(points["mlp 0"][1], 4)
        (1, 0.4738)
    """
    check_mode("faithfulness direction", direction, PAIR_DIRECTIONS, InvalidInputError)
    by_name = {c.name: c for c in select(pair.config, None, granularity)}
    for names in sets.values():
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InvalidInputError(f"{unknown[0]!r} is not a {granularity} component of this model")
    patches = {label: Patch.from_components(pair.config, [by_name[n] for n in names], label=label)
               for label, names in sets.items() if names}
    points = {label: (0, 0.0) for label, names in sets.items() if not names}  # the start model
    if patches:
        effects = _effects(pair, metric, patches, direction, execution)
        points.update({label: (len(set(sets[label])), e) for label, e in zip(patches, effects)})
    return {label: points[label] for label in sets}
