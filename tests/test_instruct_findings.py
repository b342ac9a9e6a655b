"""The instruction study's findings read off its curves (pure functions of the JSON; no model)."""

from __future__ import annotations

from experiments.instruct_study import _why_close


def _curve(sizes: list[int], f: list[float]) -> dict:
    return {"components": sizes[-1], "sizes": sizes, "faithfulness": f, "cpr": 0.0}


SIZES = [0, 1, 2, 4, 8, 16]


def test_rankings_rising_within_one_step_of_the_ladder_are_said_to_be_indistinct() -> None:
    curves = {"exact": _curve(SIZES, [0, 0, 0, 0.2, 1, 1]),
              "|dW|": _curve(SIZES, [0, 0, 0, 0, 0.6, 1]),
              "random 0": _curve(SIZES, [0, 0, 0, 0, 0, 1])}
    assert _why_close(curves, "exact") == (
        "Both first cover half the behavior at their top 8 of 16, and no ranking (random ones "
        "included) does with fewer than 8; between the measured sizes 4 and 8 the curves cannot "
        "tell the rankings apart.")


def test_a_ranking_behind_dw_is_said_to_be_so_with_its_sizes() -> None:
    curves = {"exact": _curve(SIZES, [0, 0, 0, 0, 0, 0.4]),
              "|dW|": _curve(SIZES, [0, 0.7, 1, 1, 1, 1])}
    assert _why_close(curves, "exact") == (
        "exact first covers half the behavior not before all of them, |dW| at its top 1 of 16.")
    assert _why_close({k: _curve(SIZES, [0] * 6) for k in ("exact", "|dW|")}, "exact") == (
        "No ranking's top k covers half the behavior, not even all 16 together.")
