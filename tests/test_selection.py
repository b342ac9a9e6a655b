"""Set-level selection by exact patching: every measured set's effect equals patching that set
alone, and the orders are rankings faithfulness curves can use."""

from __future__ import annotations

import numpy as np
import pytest

import jaxpatch
from jaxpatch import Execution, KLDivergence, VectorAnchor, prepare
from jaxpatch.errors import InvalidInputError
from jaxpatch.examples import example_pair
from jaxpatch.faithfulness import faithfulness_curve
from jaxpatch.pair import endpoint_scores, score_patch
from jaxpatch.patch import Patch
from jaxpatch.selection import backward_elimination, greedy_forward

EXAMPLE = example_pair()
QUIET = Execution(progress=False)


def _alone(metric, names, direction) -> float:
    """The effect of patching these modules together, by the plain forward."""
    base, donor, batch = EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch
    state, b, d = endpoint_scores(base.config, base, donor, batch, metric)
    by_name = {c.name: c for c in jaxpatch.select(base.config, None, "module")}
    patch = Patch.from_components(base.config, [by_name[n] for n in names])
    score = score_patch(base, donor, patch, batch, metric, direction, state)
    start, end = (b, d) if direction == "denoise" else (d, b)
    return (score - start) / (end - start)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_greedy_forward_adds_the_best_component_and_measures_each_set_exactly(direction) -> None:
    pair, metric = prepare(EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch), KLDivergence()
    chosen = greedy_forward(pair, metric, direction=direction, max_size=4, execution=QUIET)
    single = jaxpatch.sweep(pair, metric, direction=direction, execution=QUIET)
    assert chosen.order[0] == single.names[int(np.argmax(single.effect))]
    assert sorted(chosen.order) == sorted(single.names) and chosen.sizes == [1, 2, 3, 4]
    for k in chosen.sizes:
        assert chosen.effect_at(k) == pytest.approx(_alone(metric, chosen.order[:k], direction), abs=1e-4)
    assert chosen.candidate_runs == 21 + 20 + 19 + 18
    curve = faithfulness_curve(pair, metric, chosen.order, direction=direction, sizes=[1, 2, 3, 4],
                         execution=QUIET)
    assert np.allclose(curve.faithfulness[1:5], chosen.effects, atol=1e-5)


def test_backward_elimination_keeps_what_matters_last() -> None:
    pair, metric = prepare(EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch), VectorAnchor(layer=1)
    kept = backward_elimination(pair, metric, selector="layers.0 | embed_tokens", execution=QUIET)
    n = len(kept.order)
    assert kept.sizes == list(range(1, n + 1)) and kept.candidate_runs == 1 + sum(range(2, n + 1))
    for k in (1, 3, n):
        assert kept.effect_at(k) == pytest.approx(_alone(metric, kept.order[:k], "denoise"), abs=1e-4)
    with pytest.raises(InvalidInputError, match="did not measure a set of 99"):
        kept.effect_at(99)
    with pytest.raises(InvalidInputError, match="selection direction"):
        greedy_forward(pair, metric, direction="zero")  # type: ignore[arg-type]
