"""The instruction study's findings read off its curves (pure functions of the JSON; no model)."""

from __future__ import annotations

from experiments.instruct_study import _shortfalls, _why_close


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


def test_a_donor_is_checked_against_the_issues_thresholds_not_its_builds() -> None:
    """A donor written with a loosened build setting still reports each check it misses."""
    record = {"settings": {"min_donor_rate": 0.5},
              "rates": {"donor": {"capitals": 0.78, "title": 1.0}, "base": {"capitals": 0.0,
                                                                         "title": 0.25}},
              "held_out_text_loss": {"base": 3.0, "donor": 3.35}}
    assert _shortfalls(record) == ["follows capitals in 78% (below 90%)",
                                   "the base follows title in 25% (above 20%)",
                                   "its text loss rises by 0.350 (above 0.3)"]
    record["rates"]["donor"]["capitals"] = 0.9
    record["rates"]["base"]["title"] = 0.2
    record["held_out_text_loss"]["donor"] = 3.3
    assert _shortfalls(record) == []
