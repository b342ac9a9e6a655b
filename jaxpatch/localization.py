"""Narrow, then verify: rank components by attribution, patch the top k (and a random control
sample) exactly, and report how far the ranking can be trusted (Spearman correlation, the most
misranked components, and with an exhaustive sweep the recall of the exact top set)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxpatch.attribution import attribute
from jaxpatch.components import SelectorLike, select
from jaxpatch.engine import PreparedPair, sweep
from jaxpatch.metrics import Metric
from jaxpatch.modes import AttributionMethod, Granularity, PairDirection
from jaxpatch.results import Misranked, SweepResult, misranked_to_dicts
from jaxpatch.runs.settings import Execution, execution_of
from jaxpatch.stats import average_ranks, spearman

__all__ = ["Verification", "Localization", "localize"]


@dataclasses.dataclass(frozen=True)
class Verification:
    """How `localize` checks an attribution ranking by exact patching.

    Attributes:
        top_k: how many top-ranked components to verify.
        controls: how many of the remaining components to verify, drawn at random.
        exhaustive: also patch every component exactly (small models), to report recall.
        recall_k: with `exhaustive`, the size of the exact top set whose recall is reported
            (default `top_k`): with a shortlist larger than it, recall asks whether the
            shortlist caught the truly strongest components.
        seed: the control sample's seed (recorded).

    Example:
        >>> Verification(top_k=50).controls
        20
    """

    top_k: int = 20
    controls: int = 20
    exhaustive: bool = False
    recall_k: int | None = None
    seed: int = 0


@dataclasses.dataclass(kw_only=True)
class Localization:
    """The report of `localize`.

    Attributes:
        attribution: attribution scores of every component.
        exact: exact scores of the verified components (the shortlist and the controls).
        shortlist: names of the top-k components by attribution effect.
        controls: names of the random control sample.
        spearman: rank correlation between attribution and exact effects on the verified set.
        recall: with `exhaustive`, the share of the exact top `recall_k` components that
            the shortlist caught.
        misranked: the verified components whose attribution rank was furthest from their
            exact rank, as (name, attribution rank, exact rank).
        exhaustive: the exact scores of every component, when asked for.
    """

    attribution: SweepResult
    exact: SweepResult
    shortlist: list[str]
    controls: list[str]
    spearman: float
    recall: float | None
    misranked: list[Misranked]
    exhaustive: SweepResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON data."""
        return {"shortlist": self.shortlist, "controls": self.controls, "spearman": self.spearman,
                "recall": self.recall,
                "misranked": misranked_to_dicts(self.misranked),
                "attribution": self.attribution.to_dict(), "exact": self.exact.to_dict(),
                "exhaustive": self.exhaustive.to_dict() if self.exhaustive is not None else None}


def localize(pair: PreparedPair, metric: Metric, *, granularity: Granularity = "neuron",
             selector: SelectorLike | None = None, method: AttributionMethod = "first-order",
             steps: int = 16, direction: PairDirection = "denoise",
             verify: Verification | None = None, execution: Execution | None = None) -> Localization:
    """Ranks components by attribution, then patches the top k and a random control sample
    exactly and reports how far the ranking can be trusted.

    Arguments:
        pair, metric, granularity, selector, method, steps, direction: as for `attribute`.
        verify: how many components to verify exactly, and how (`Verification`).
        execution: as for `attribute` and `sweep` (the log holds the attribution table and
            the exact sweeps' chunks).

    Returns:
        A `Localization`.

    Example:
        >>> report = localize(pair, jaxpatch.VectorAnchor(layer=1),
        ...                   verify=Verification(top_k=4, controls=4, exhaustive=True))
        >>> len(report.shortlist), len(report.exact.names), 0.0 <= report.recall <= 1.0
        (4, 8, True)
    """
    execution = execution_of(execution)
    verify = Verification() if verify is None else verify
    scored = attribute(pair, metric, granularity=granularity, selector=selector, method=method,
                       steps=steps, direction=direction, execution=execution)
    top_k, controls, seed = verify.top_k, verify.controls, verify.seed
    items = select(pair.config, selector, granularity)
    order = np.argsort(-np.abs(scored.effect), kind="stable")
    k = min(top_k, len(items))
    shortlist = [int(i) for i in order[:k]]
    rest = [int(i) for i in order[k:]]
    rng = np.random.default_rng(seed)
    control = sorted(rng.choice(rest, size=min(controls, len(rest)), replace=False).tolist()) if rest else []
    verified = sorted(shortlist + control)
    exact = sweep(pair, metric, candidates=[items[i] for i in verified], direction=direction,
                  execution=execution.sub("verify"))
    approx = scored.effect[verified]
    rho = spearman(approx, exact.effect)
    rank_attr = average_ranks(-np.abs(approx))
    rank_exact = average_ranks(-np.abs(exact.effect))
    gaps = np.abs(rank_attr - rank_exact)
    misranked = [(exact.names[i], int(rank_attr[i]), int(rank_exact[i]))
                 for i in np.argsort(-gaps, kind="stable")[:5] if gaps[i] > 0]
    full = None
    recall = None
    if verify.exhaustive:
        full = sweep(pair, metric, candidates=items, direction=direction,
                     execution=execution.sub("exhaustive"))
        k_truth = min(verify.recall_k or k, len(items))
        truth = set(np.argsort(-np.abs(full.effect), kind="stable")[:k_truth].tolist())
        recall = len(truth & set(shortlist)) / k_truth
    scored.extra["seed"] = seed
    return Localization(attribution=scored, exact=exact,
                        shortlist=[items[i].name for i in shortlist],
                        controls=[items[i].name for i in control], spearman=rho, recall=recall,
                        misranked=misranked, exhaustive=full)
