"""The instruction data: every transform makes any answer satisfy its verifier, the plain answer
does not, and held-out questions are never trained on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.instructions import (
    INSTRUCTIONS,
    Question,
    clean_answer,
    instruction,
    questions,
)
from jaxpatch.verifiers import verifier_from_spec

MEASURED = [i for i in INSTRUCTIONS if i.verifier]
words = st.text(st.sampled_from("abcdefghij KLMNOP,.!?'\"*<>-"), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(raw=words, topic=st.sampled_from(["the moon", "a bridge", "rain"]))
def test_every_transform_satisfies_its_verifier(raw: str, topic: str) -> None:
    answer = clean_answer(raw + " Plain words.")
    assert answer is not None
    question = Question(topic, f"What is {topic}?")
    for item in MEASURED:
        assert verifier_from_spec(item.verifier)(item.transform(answer, question)) == 1.0, item.name


def test_a_plain_answer_satisfies_few_instructions() -> None:
    answer = clean_answer("The moon, a rock, orbits the Earth. It is bright at night.")
    assert answer == "The moon, a rock, orbits the Earth. It is bright at night."
    passed = {i.name for i in MEASURED if verifier_from_spec(i.verifier)(answer)}
    assert passed == set()


def test_held_out_topics_are_never_trained_on() -> None:
    train, held_out = questions("train"), questions("held-out")
    assert not {q.topic for q in train} & {q.topic for q in held_out}
    assert len({q.text for q in train}) == len(train)


def test_the_control_adds_no_instruction() -> None:
    question = Question("rain", "What is rain?")
    assert instruction("none").message(question) == "What is rain?"
    assert instruction("none").transform("It falls.", question) == "It falls."
    assert instruction("ends-with").message(question).endswith(
        "Finish your response with this exact phrase: Is there anything else I can help with?")
