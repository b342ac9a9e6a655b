"""The instruction study on a tiny random Gemma 3 pair (the real study runs by its command on the
built gemma-3-270m pair): every part runs and what must hold by construction holds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import pytest

import jaxpatch
from experiments.instruct_pair import reply_text, write
from experiments.instruct_study import StudySettings, _curves, instruction_prompts, load_pair, markdown, study
from experiments.instruct_study import write as write_study
from jaxpatch import prepare
from jaxpatch.errors import InvalidInputError
from jaxpatch.prompts import make_batch
from jaxpatch.verifiers import TextJudge, verifier_from_spec

pytestmark = pytest.mark.slow

TINY = StudySettings(instructions=("capitals",), score_prompts=2, judge_prompts=3, new_tokens=4,
                     ig_steps=2, learned_steps=2, neurons_verified=4, random=1, min_whole=0.0,
                     noise_curves=("module", "head", "neuron"),
                     hierarchy=("capitals",), top=3)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_instruct_build: dict) -> Path:
    """A tiny pair in the builder's folder format. A random tiny Gemma echoes its last token
    whatever three steps of training did; the donor's final norm is negated so that base and
    donor write different text, and the judge checks an ending the donor's text has (on the
    first three prompts: base "ients", "ed ed ed ed", "ed ed ed ed"; donor "ar t ge tree",
    "ar nents ar ors", "ar t f fro")."""
    folder = tmp_path_factory.mktemp("instruct") / "pair"
    built = tiny_instruct_build
    params = dict(built["donor"].params)
    params["norm"] = {"weight": jnp.full_like(params["norm"]["weight"], -2.0)}
    write({**built, "donor": dataclasses.replace(built["donor"], params=params)}, folder)
    record = json.loads((folder / "instruct.json").read_text())
    record["instructions"]["capitals"]["verifier"] = "ends-with:o"
    (folder / "instruct.json").write_text(json.dumps(record))
    return folder


def test_the_instruction_tokens_are_marked(tiny_pair) -> None:
    pair = load_pair(tiny_pair)
    prompt = instruction_prompts(pair, "capitals", 0, 1)[0]
    first, last = prompt.marked[0], prompt.marked[-1]
    assert list(prompt.marked) == list(range(first, last + 1)) and len(prompt.marked) > 10
    tokenizer = pair.base.tokenizer  # the fixture's small vocabulary: compare without spaces

    def text(ids) -> str:
        return tokenizer.decode(list(ids)).replace(" ", "")

    marked = text(prompt.tokens[i] for i in prompt.marked)
    assert "entireresponse" in marked and marked.endswith("capitalletters")
    assert "response" not in text(prompt.tokens[:first])
    assert "letters" not in text(prompt.tokens[last + 1:])
    with pytest.raises(InvalidInputError, match="no instruction 'haiku'"):
        instruction_prompts(pair, "haiku", 0, 1)


def test_the_study_runs_every_part(tiny_pair, tmp_path) -> None:
    pair = load_pair(tiny_pair)
    document, figures = study(pair, TINY, second=pair, log=lambda line: None)
    r = document["instructions"]["capitals"]
    for granularity in ("module", "head", "neuron"):
        for direction in ("denoise", "noise"):
            drawn = r["granularities"][granularity]["directions"][direction]
            curves = drawn["curves"]
            assert {"|dW|", "random 0"} <= set(curves)
            ends = {(c["faithfulness"][0], c["faithfulness"][-1]) for c in curves.values()}
            assert {start for start, _ in ends} == {0.0}, granularity  # nothing patched
            assert {end for _, end in ends} == {drawn["whole"]}, granularity
    module = r["granularities"]["module"]["directions"]
    assert module["denoise"]["whole"] == 1.0 and module["noise"]["whole"] == 1.0  # the models
    assert {"exact denoise", "exact noise", "first-order", "integrated gradients",
            "learned patch"} <= set(module["denoise"]["curves"])
    assert "narrow then verify" in r["granularities"]["neuron"]["directions"]["noise"]["curves"]
    positions = r["positions"]
    assert positions["everywhere"]["whole_donor"] == pytest.approx(1.0)
    assert 0.0 <= positions["response"]["jaccard_with_everywhere"] <= 1.0
    assert r["donors"]["jaccard_exact"] == 1.0 and r["donors"]["jaccard_ig"] == 1.0  # one pair
    assert set(r["hierarchy"]["roles"]) == {"source", "aggregation", "execution"}
    assert {f"capitals-{g}-{d}.png" for g in ("module", "head", "neuron")
            for d in ("denoise", "noise")} | {"capitals-hierarchy.png"} == set(figures)
    write_study(document, figures, tmp_path)
    page = (tmp_path / "instruct_pair.md").read_text()
    assert page == markdown(json.loads((tmp_path / "instruct_pair.json").read_text()))
    assert ("| top-10 modules of two donors by integrated gradients, Jaccard >= 0.5 | capitals 1.00 "
            "(exact denoise: 1.00) | met |" in page)
    assert ("Two donors: the top-10 modules overlap (Jaccard) by capitals 1.00 by exact denoise, "
            "1.00 by integrated gradients") in page
    assert "](instruct_pair/capitals-head-noise.png)" in page
    assert page.count("\n- donor (seed ") == 2  # each donor's build checked
    assert (tmp_path / "instruct_pair" / "capitals-head-noise.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_are_drawn_only_where_the_whole_granularity_moves_the_behavior(tiny_pair) -> None:
    """Below `min_whole` a direction's curves are not drawn (no ranking could rise), and what
    every component together moves is still reported."""
    pair = load_pair(tiny_pair)
    batch = make_batch(pair.base.config, instruction_prompts(pair, "capitals", 0, 2), "last")
    prepared = prepare(pair.base, pair.donor, batch)
    spec = load_pair(tiny_pair).record["instructions"]["capitals"]["verifier"]
    judge = TextJudge(spec, verifier_from_spec(spec), instruction_prompts(pair, "capitals", 2, 3),
                      4, lambda ids: reply_text(pair.base.tokenizer, ids))
    modules = [c.name for c in jaxpatch.select(prepared.config, None, "module")]
    timings: dict[str, float] = {}
    drawn = _curves(prepared, judge, {"|dW|": modules}, "module",
                    dataclasses.replace(TINY, min_whole=1.5), timings)
    only_denoise = _curves(prepared, judge, {"|dW|": modules}, "module",
                           dataclasses.replace(TINY, min_whole=1.5, noise_curves=()), {})
    assert list(only_denoise) == ["denoise"]
    assert drawn == {"denoise": {"whole": 1.0, "curves": {}}, "noise": {"whole": 1.0, "curves": {}}}
    assert set(timings) == {"module denoise all", "module noise all"}
