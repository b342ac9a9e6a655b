"""Verifiers of generated text, and behavior judged by them: a patched model's judged score is
what patching it alone, generating and verifying gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxpatch import Patch, apply, prepare
from jaxpatch.errors import InvalidInputError
from jaxpatch.examples import example_pair
from jaxpatch.faithfulness import faithfulness_curve, set_points
from jaxpatch.prompts import Prompt, greedy_continuations
from jaxpatch.verifiers import (
    TextJudge,
    all_capitals,
    all_lowercase,
    capital_share,
    ends_with,
    has_title,
    highlighted,
    no_commas,
    quoted,
    sections,
    word_count,
)


@given(st.text(max_size=60), st.text(alphabet="abcXYZ!? ", min_size=1, max_size=8))
def test_verifier_properties(text: str, suffix: str) -> None:
    has_letters = any(c.isalpha() for c in text)
    assert 0.0 <= capital_share(text) <= 1.0
    if has_letters:
        assert (capital_share(text) == 1.0) == (all_capitals(text) == 1.0)
    assert all_capitals(text) + all_lowercase(text) <= 1.0
    assert no_commas(text + ",") == 0.0
    n = len(text.split())
    assert word_count(at_least=n, at_most=n)(text) == 1.0 and word_count(at_least=n + 1)(text) == 0.0
    if suffix.strip():
        assert ends_with(suffix.strip())(text + suffix) == 1.0


@pytest.mark.parametrize(("verifier", "good", "bad"), [
    (all_capitals, "THE ANSWER IS 42.", "The answer"),
    (all_lowercase, "the answer is 42.", "the Answer"),
    (no_commas, "one two three", "one, two"),
    (quoted, '"the whole answer"', 'the "answer"'),
    (has_title, "<<Ode to JAX>>\nverses", "no title <<>>"),
    (ends_with("Any other questions?"), "Done. Any other questions?", "Any other questions? Done."),
    (word_count(at_least=3, at_most=5), "one two three four", "one two"),
    (sections(2), "SECTION 1\nintro\nSECTION 2\nbody", "SECTION 1 only"),
    (highlighted(2), "*first* and *second*", "*only one*"),
])
def test_each_verifier_on_a_satisfying_and_a_failing_text(verifier, good, bad) -> None:
    assert verifier(good) == 1.0 and verifier(bad) == 0.0


def test_a_judged_curve_is_generating_with_the_top_k_alone_and_verifying() -> None:
    example = example_pair()
    base, donor, config = example.base, example.donor, example.config
    pair = prepare(base, donor, example.batch)
    prompts = [Prompt((1, 2, 3)), Prompt((7, 8)), Prompt((11, 12, 13, 14))]

    def decode(ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def even_share(text: str) -> float:  # the share of even token ids: a continuous behavior
        ids = [int(t) for t in text.split()]
        return float(np.mean([i % 2 == 0 for i in ids]))

    judge = TextJudge("even tokens", even_share, prompts, 5, decode)
    order = ["layers.1.mlp.down_proj", "layers.0.self_attn.v_proj", "lm_head", "norm",
             "layers.1.mlp.up_proj", "embed_tokens"]
    curve = faithfulness_curve(pair, judge, order, sizes=[1, 3])

    def judged(params) -> float:
        return float(np.mean([even_share(decode(row))
                              for row in greedy_continuations(config, params, prompts, 5)]))

    start, end = judged(base.params), judged(donor.params)
    components = {n: Patch.from_selector(config, n) for n in order}
    for k in curve.sizes[1:]:
        patch = Patch(components[order[0]].alpha)
        for name in order[1:k]:
            patch = patch | components[name]
        alone = judged(apply(patch, base.params, donor.params))
        assert curve.at(k) == pytest.approx((alone - start) / (end - start), abs=1e-9)
    points = set_points(pair, judge, {"top 3": order[:3]})
    assert points["top 3"] == (3, pytest.approx(curve.at(3), abs=1e-9))
    same = TextJudge("constant", lambda text: 1.0, prompts, 2, decode)
    with pytest.raises(InvalidInputError, match="base and donor score the same"):
        same.endpoints(pair)
    with pytest.raises(InvalidInputError, match="has no prompts"):
        TextJudge("empty", no_commas, [], 2, decode).scores(pair, {"x": components["norm"]})


def test_a_judges_endpoints_are_generated_once_per_pair() -> None:
    """Every curve and set judged on one pair reuses the base's and donor's scores; another
    pair, or another judge, generates its own."""
    example = example_pair()
    pair = prepare(example.base, example.donor, example.batch)
    calls = []

    def counted(text: str) -> float:
        calls.append(text)
        return float(len(text.split()) % 2)

    prompts = [Prompt((1, 2, 3)), Prompt((7, 8))]
    judge = TextJudge("counted", counted, prompts, 3,
                      lambda ids: " ".join(map(str, ids[:ids[0] % 3 + 1])))
    first = judge.endpoints(pair)
    assert len(calls) == 2 * len(prompts)
    faithfulness_curve(pair, judge, ["norm", "lm_head"], sizes=[1])
    assert judge.endpoints(pair) == first
    assert len(calls) == 2 * len(prompts) + 2 * len(prompts)  # only the curve's two sets
    judge.endpoints(prepare(example.base, example.donor, example.batch))
    assert len(calls) == 6 * len(prompts)
