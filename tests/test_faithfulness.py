"""Faithfulness curves: f(k) equals patching the top k alone and running the plain forward; CPR
and CMD equal a hand computation; rankings and sets are checked like any input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxpatch
from jaxpatch import Execution, KLDivergence, LogProb, VectorAnchor, prepare
from jaxpatch.errors import InvalidInputError
from jaxpatch.examples import example_pair
from jaxpatch.faithfulness import (
    FaithfulnessCurve,
    area,
    faithfulness_curve,
    ranking,
    set_points,
    size_ladder,
)
from jaxpatch.pair import endpoint_scores, score_patch
from jaxpatch.patch import Patch
from jaxpatch.prompts import make_batch
from jaxpatch.studies.evaluate import default_pair_dir, load_planted

EXAMPLE = example_pair()
QUIET = Execution(progress=False)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("metric", [KLDivergence(), VectorAnchor(layer=1), LogProb()],
                         ids=["kl", "anchor", "logprob"])
def test_each_point_is_the_top_k_patched_alone(direction, metric) -> None:
    base, donor, batch = EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch
    pair = prepare(base, donor, batch)
    order = ranking(jaxpatch.sweep(pair, metric, execution=QUIET), "size")
    curve = faithfulness_curve(pair, metric, order, direction=direction, sizes=[1, 3, 7, 21],
                         execution=QUIET)
    assert curve.sizes == [0, 1, 3, 7, 21] and curve.at(0) == 0.0
    state, base_score, donor_score = endpoint_scores(base.config, base, donor, batch, metric)
    start, end = (base_score, donor_score) if direction == "denoise" else (donor_score, base_score)
    components = {c.name: c for c in jaxpatch.select(base.config, None, "module")}
    for k in curve.sizes[1:]:
        patch = Patch.from_components(base.config, [components[n] for n in order[:k]])
        alone = score_patch(base, donor, patch, batch, metric, direction, state)
        assert curve.at(k) == pytest.approx((alone - start) / (end - start), abs=1e-4)
    assert curve.at(21) == pytest.approx(1.0, abs=1e-4)  # every module: the other model


def test_cpr_and_cmd_equal_a_hand_computation() -> None:
    # x = k / 4 = 0, 1/4, 1/2, 1; f = 0, 0.5, 0.25, 1.25 (a set can overshoot the donor)
    curve = FaithfulnessCurve(label="hand", direction="denoise", order=list("abcd"),
                              sizes=[0, 1, 2, 4], faithfulness=np.array([0.0, 0.5, 0.25, 1.25]))
    # CPR: 1/4 (0 + .5)/2 + 1/4 (.5 + .25)/2 + 1/2 (.25 + 1.25)/2 = .0625 + .09375 + .375
    assert curve.cpr == pytest.approx(0.53125)
    # CMD: |1 - f| = 1, .5, .75, .25: 1/4 (1.5)/2 + 1/4 (1.25)/2 + 1/2 (1)/2
    assert curve.cmd == pytest.approx(0.1875 + 0.15625 + 0.25)
    assert curve.to_dict()["cpr"] == curve.cpr and curve.to_dict()["sizes"] == [0, 1, 2, 4]


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_cpr_and_cmd_add_to_one_when_f_lies_between_0_and_1(values) -> None:
    n = len(values)
    curve = FaithfulnessCurve(label="p", direction="noise", order=[str(i) for i in range(n)],
                              sizes=list(range(n + 1)), faithfulness=np.array([0.0, *values]))
    assert curve.cpr + curve.cmd == pytest.approx(1.0)
    assert area([0.0, 1.0], [1.0, 1.0]) == 1.0


def test_rankings_sizes_and_sets() -> None:
    scores = {"a": 0.2, "b": -0.7, "c": 0.2, "d": 0.9}
    assert ranking(scores) == ["d", "a", "c", "b"]  # ties keep their order
    assert ranking(scores, "size") == ["d", "b", "a", "c"]
    assert size_ladder(1) == [0, 1] and size_ladder(8) == [0, 1, 2, 4, 8] and size_ladder(0) == [0]
    pair = prepare(EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch)
    metric = VectorAnchor(layer=1)
    order = [c.name for c in jaxpatch.select(pair.config, None, "module")]
    curve = faithfulness_curve(pair, metric, order, sizes=[5], execution=QUIET)
    points = set_points(pair, metric, {"first five": order[:5], "none": []}, execution=QUIET)
    assert points["first five"][0] == 5 and points["first five"][1] == pytest.approx(curve.at(5), abs=1e-5)
    assert points["none"] == (0, pytest.approx(0.0, abs=1e-6))
    with pytest.raises(InvalidInputError, match="'layers.9.mlp' is not a module component"):
        faithfulness_curve(pair, metric, ["layers.9.mlp"])
    with pytest.raises(InvalidInputError, match="names a component twice"):
        faithfulness_curve(pair, metric, [order[0], order[0]])
    with pytest.raises(InvalidInputError, match="sizes must lie in 0..2"):
        faithfulness_curve(pair, metric, order[:2], sizes=[3])
    assert faithfulness_curve(pair, metric, order[:3], sizes=[1], execution=QUIET).sizes == [0, 1, 3]
    with pytest.raises(InvalidInputError, match="faithfulness direction"):
        faithfulness_curve(pair, metric, order, direction="zero")  # type: ignore[arg-type]


def test_several_rankings_share_their_sets_and_equal_one_ranking_at_a_time(monkeypatch) -> None:
    """Rankings scored together give each one's own curve, and a set two rankings share (here
    every ranking's top n, and the top 1 of two rankings that start alike) is scored once."""
    import jaxpatch.faithfulness as faithfulness

    pair = prepare(EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch)
    metric = VectorAnchor(layer=1)
    order = [c.name for c in jaxpatch.select(pair.config, None, "module")]
    rankings = {"given": order, "reversed": order[::-1],
                "swapped": [order[0], *order[1:][::-1]]}
    scored: list[int] = []
    effects = faithfulness._effects

    def counting(pair_, metric_, patches, direction, execution):
        scored.append(len(patches))
        return effects(pair_, metric_, patches, direction, execution)

    monkeypatch.setattr(faithfulness, "_effects", counting)
    together = faithfulness.faithfulness_curves(pair, metric, rankings, direction="noise",
                                                execution=QUIET)
    ladder = size_ladder(len(order))[1:]
    assert scored == [3 * len(ladder) - 2 - 1]  # the shared top n twice, the shared top 1 once
    assert list(together) == list(rankings)
    for label, order_ in rankings.items():
        alone = faithfulness_curve(pair, metric, order_, direction="noise", label=label,
                                   execution=QUIET)
        assert together[label].sizes == alone.sizes and together[label].label == label
        np.testing.assert_allclose(together[label].faithfulness, alone.faithfulness, atol=1e-5)
    assert together["given"].at(1) == together["swapped"].at(1)
    whole = together["given"].at(len(order))  # measured already: not scored again
    again = faithfulness.faithfulness_curves(pair, metric, rankings, direction="noise",
                                             whole=whole, execution=QUIET)
    assert scored[-1] == scored[0] - 1
    for label in rankings:
        np.testing.assert_allclose(again[label].faithfulness, together[label].faithfulness,
                                   atol=1e-5)  # other sets in a sweep: other batches
    with pytest.raises(InvalidInputError, match="ranking 'bad'"):
        faithfulness.faithfulness_curves(pair, metric, {"good": order, "bad": ["layers.9.mlp"]})


def test_on_the_shipped_pair_the_planted_set_carries_the_behavior_first() -> None:
    """S's own curve is the reference a localization is held to: S first recovers the answers
    by k = |S|, where a random order has recovered almost nothing."""
    planted = load_planted(default_pair_dir())
    config = planted.base.config
    pair = prepare(planted.base, planted.donor, make_batch(config, planted.prompts, "targets"),
                   positions="targets")
    items = jaxpatch.select(config, None, "module")
    inside = dict(zip([c.name for c in items],
                      jaxpatch.planted_labels(config, jaxpatch.plant_patch(config, planted.plant),
                                              items)))
    s_first = [n for n in inside if inside[n]] + [n for n in inside if not inside[n]]
    k = sum(inside.values())
    rng = np.random.default_rng(0)
    shuffled = list(rng.permutation(s_first))
    reference = faithfulness_curve(pair, LogProb(), s_first, sizes=[k], execution=QUIET)
    random = faithfulness_curve(pair, LogProb(), shuffled, sizes=[k], execution=QUIET)
    assert reference.at(k) > 0.9 and random.at(k) < reference.at(k) - 0.3
    assert reference.cpr > random.cpr


def test_cli_faithfulness_writes_curves_against_baselines_and_resumes(tmp_path, capsys) -> None:
    import json

    from jaxpatch.cli import main

    folder = default_pair_dir()
    run = ["faithfulness", "--base", str(folder / "base"), "--donor", str(folder / "donor"),
           "--prompts", str(folder / "prompts" / "map.jsonl"), "--metric", "logprob",
           "--sizes", "1,4,11", "--random", "2", "--no-progress"]
    exact = tmp_path / "exact"
    assert main(["sweep", *run[1:7], "--metric", "logprob", "--direction", "noise", "--no-progress",
                 "--out", str(exact)]) == 0
    out = tmp_path / "curves"
    assert main([*run, "--ranking", str(exact / "scores.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact noise (logprob)" in printed and "|dW|" in printed and "random (2)" in printed
    record = json.loads((out / "faithfulness.json").read_text())
    labels = [c["label"] for c in record["curves"]["denoise"]]
    assert labels == ["exact noise (logprob)", "|dW|"] and len(record["random"]["noise"]) == 2
    first = record["curves"]["noise"][0]
    assert first["sizes"] == [0, 1, 4, 11, 39] and first["faithfulness"][0] == 0.0
    assert abs(first["faithfulness"][-1] - 1.0) < 1e-4  # every module: the base itself
    rows = (out / "faithfulness.csv").read_text().splitlines()
    assert rows[0] == "ranking,direction,k,fraction,faithfulness" and len(rows) == 1 + 2 * 4 * 5
    assert (out / "faithfulness-denoise.png").read_bytes()[:4] == b"\x89PNG"
    written = (out / "faithfulness.json").read_text()
    assert main([*run, "--ranking", str(exact / "scores.json"), "--out", str(out)]) == 0
    assert "resuming the run" in capsys.readouterr().err
    assert (out / "faithfulness.json").read_text() == written
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main([*run, "--ranking", str(bad), "--out", str(tmp_path / "never")]) == 2
    assert "bad.json: not a jaxpatch scores.json" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_faithfulness_judges_sets_by_the_text_the_patched_models_write(tmp_path, capsys) -> None:
    import json

    from jaxpatch.cli import main

    folder = default_pair_dir()
    run = ["faithfulness", "--base", str(folder / "base"), "--donor", str(folder / "donor"),
           "--prompts", str(folder / "prompts" / "map.jsonl"), "--metric", "logprob",
           "--direction", "denoise", "--sizes", "4", "--random", "1", "--no-progress",
           "--new-tokens", "6"]
    # the donor answers and stops (`... <eos>`); the base never writes an end token
    out = tmp_path / "judged"
    assert main([*run, "--judge", "ends-with:<eos>", "--out", str(out)]) == 0
    assert "behavior: ends-with:<eos> in generated text" in capsys.readouterr().out
    record = json.loads((out / "faithfulness.json").read_text())
    assert record["judge"] == {"name": "ends-with:<eos>", "prompts": 32, "n_tokens": 6}
    for curve in record["curves"]["denoise"] + record["random"]["denoise"]:
        # no module: the base's own text (0); every module: the donor's own text (exactly 1)
        assert curve["faithfulness"][0] == 0.0 and curve["faithfulness"][-1] == 1.0
    assert all(f * 32 == round(f * 32) for f in record["curves"]["denoise"][0]["faithfulness"])
    assert main([*run, "--judge", "shouting", "--out", str(tmp_path / "never")]) == 2
    assert "verifier 'shouting' is not understood; one of: capitals" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("spec", "text", "value"), [
    ("capitals", "HELLO WORLD", 1.0), ("capitals", "Hello", 0.0), ("lowercase", "hello", 1.0),
    ("no-commas", "a, b", 0.0), ("quoted", '"hi"', 1.0), ("title", "<<T>> body", 1.0),
    ("ends-with:bye", "ok bye", 1.0), ("words:-2", "one two three", 0.0),
    ("words:3-", "one two three", 1.0), ("sections:2", "SECTION 1 a SECTION 2 b", 1.0),
    ("highlighted:1", "plain", 0.0), ("capital-share", "Ab", 0.5)])
def test_verifier_specs_name_the_verifiers(spec, text, value) -> None:
    from jaxpatch.verifiers import verifier_from_spec

    assert verifier_from_spec(spec)(text) == value


@pytest.mark.parametrize("spec", ["", "capitals:1", "words:x-3", "words:4", "sections:", "ends-with:",
                                  "highlighted:two"])
def test_malformed_verifier_specs_are_refused_in_one_line(spec) -> None:
    from jaxpatch.verifiers import verifier_from_spec

    with pytest.raises(InvalidInputError, match="is not understood; one of"):
        verifier_from_spec(spec)
