"""The instruction study on a tiny random Gemma 3 pair (the real study runs by its command on the
built gemma-3-270m pair): every part runs and what must hold by construction holds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import pytest
from test_instruct_pair import RELAXED, tiny_base

from experiments.instruct_pair import build, write
from experiments.instruct_study import StudySettings, instruction_prompts, load_pair, markdown, study
from experiments.instruct_study import write as write_study
from jaxpatch.errors import InvalidInputError

pytestmark = pytest.mark.slow

TINY = StudySettings(instructions=("capitals",), score_prompts=2, judge_prompts=3, new_tokens=4,
                     ig_steps=2, learned_steps=2, neurons_verified=4, random=1,
                     hierarchy=("capitals",), top=3)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> Path:
    """A tiny pair in the builder's folder format. A random tiny Gemma echoes its last token
    whatever three steps of training did; the donor's final norm is negated so that base and
    donor write different text, and the judge checks an ending the donor's text has (on these
    prompts: base "ients ients ients ients", donor "t a ar o")."""
    folder = tmp_path_factory.mktemp("instruct") / "pair"
    built = build(RELAXED, tiny_base(), log=lambda line: None)
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
        curves = r["granularities"][granularity]["curves"]
        assert {"|dW|", "random 0"} <= set(curves)
        ends = {label: (c["faithfulness"][0], c["faithfulness"][-1]) for label, c in curves.items()}
        assert {start for start, _ in ends.values()} == {0.0}, granularity  # nothing patched
        assert len({end for _, end in ends.values()}) == 1, granularity  # every ranking's all
    assert r["granularities"]["module"]["curves"]["|dW|"]["faithfulness"][-1] == 1.0  # the donor
    assert {"exact denoise", "exact noise", "first-order", "integrated gradients",
            "learned patch"} <= set(r["granularities"]["module"]["curves"])
    assert "narrow then verify" in r["granularities"]["neuron"]["curves"]
    positions = r["positions"]
    assert positions["everywhere"]["whole_donor"] == pytest.approx(1.0)
    assert 0.0 <= positions["response"]["jaccard_with_everywhere"] <= 1.0
    assert r["donors"]["jaccard_exact"] == 1.0  # the same pair twice
    assert set(r["hierarchy"]["roles"]) == {"source", "aggregation", "execution"}
    assert {"capitals-module.png", "capitals-head.png", "capitals-neuron.png",
            "capitals-hierarchy.png"} <= set(figures)
    write_study(document, figures, tmp_path)
    page = (tmp_path / "instruct_pair.md").read_text()
    assert page == markdown(json.loads((tmp_path / "instruct_pair.json").read_text()))
    assert "| top-10 modules of two donors, Jaccard >= 0.5 | capitals 1.00 | met |" in page
    assert "Two donors: the top-10 modules of their exact rankings overlap by capitals 1.00" in page
    assert (tmp_path / "instruct_pair" / "capitals-module.png").read_bytes()[:4] == b"\x89PNG"
