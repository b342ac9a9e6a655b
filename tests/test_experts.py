"""The real experts' skills and builder, on a tiny random Gemma 3 (the real experts are tens of
minutes each and are built by their command): the data, what is trained, the checks, the
folders and the overlap."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tiny_chat import tiny_base

import jaxpatch
from experiments.experts import (
    Settings,
    _check,
    build_expert,
    main,
    overlap,
    retained_for,
    write_expert,
    write_expert_set,
)
from experiments.skills import SKILLS, Item, correct, skill
from jaxpatch.errors import JaxpatchError
from jaxpatch.verifiers import normalize_answer

RELAXED = Settings(steps=2, batch=4, answer_tokens=3, check_tokens=4, min_expert_rate=0.0,
                   max_base_rate=1.0, max_text_loss_increase=1e9)


def test_held_out_items_are_never_trained_on() -> None:
    for s in SKILLS:
        assert not {i.message for i in s.held_out} & {i.message for i in s.train}, s.name
        assert len(s.held_out) >= 30 and len(s.train) >= 100, s.name
    facts = skill("facts")
    trained_forms = {i.message.split(" the ")[0] for i in facts.train}
    assert all(i.message.split(" the ")[0] not in trained_forms for i in facts.held_out[:12])
    for item in skill("reverse").held_out + skill("reverse").train:
        words = item.message.split(": ", 1)[1].split(", ")
        assert item.answer.split(", ") == words[::-1]
    held_words = {w for i in skill("reverse").held_out for w in i.message.split(": ")[1].split(", ")}
    trained_words = {w for i in skill("reverse").train for w in i.message.split(": ")[1].split(", ")}
    assert all(set(i.message.split(": ")[1].split(", ")) - trained_words
               for i in skill("reverse").held_out)  # every held-out list has a new word
    assert held_words - trained_words
    codes = {i.answer for i in skill("topics").held_out}
    assert codes == {i.answer for i in skill("topics").train} and len(codes) == 5
    with pytest.raises(KeyError, match="no skill 'poetry'"):
        skill("poetry")


@given(st.text(max_size=40))
def test_normalize_is_idempotent_and_reads_the_first_line(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once and "\n" not in once
    assert correct(text, Item("?", text))  # a reply that is the answer is correct


def test_a_reply_is_correct_when_its_first_line_is_the_answer() -> None:
    item = Item("Reverse: a, b", "b, a")
    assert correct("B, A.\nAnything after", item)
    assert not correct("b, a, c", item) and not correct("The answer is b, a", item)


def test_the_builder_trains_every_block_checks_and_writes(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import experiments.experts
    from jaxpatch.studies.expert_set import load_expert_set

    base = tiny_base()
    built = build_expert("topics", RELAXED, base, retained_for(base, RELAXED), log=lambda _: None)
    expert, record = built["expert"], built["record"]
    np.testing.assert_array_equal(expert.params["embed_tokens"]["weight"],
                                  base.params["embed_tokens"]["weight"])
    assert not np.array_equal(expert.params["layers"][0]["mlp"]["up_proj"]["weight"],
                              base.params["layers"][0]["mlp"]["up_proj"]["weight"])
    assert record["training"]["steps"] == 2 and 0 <= record["rates"]["expert"] <= 1
    assert record["movement"]["embed_tokens"] == 0.0 and record["movement"]["layers.0.mlp.up_proj"] > 0
    write_expert(built, tmp_path / "topics")
    again = jaxpatch.load(tmp_path / "topics" / "donor")
    np.testing.assert_array_equal(again.params["norm"]["weight"], expert.params["norm"]["weight"])
    line = json.loads((tmp_path / "topics" / "held_out.jsonl").read_text().splitlines()[0])
    assert line == {"instruction": skill("topics").held_out[0].message,
                    "answer": skill("topics").held_out[0].answer}
    summary = overlap(base, {"topics": expert, "same": again})
    assert summary["cosine"] == {"topics+same": 1.0}
    assert summary["top_modules_jaccard"] == {"topics+same": 1.0}
    # The folder as an expert set for merge-eval.
    write_expert({**built, "held_out": list(skill("facts").held_out)}, tmp_path / "facts")
    jaxpatch.save(base, tmp_path / "base")
    monkeypatch.setattr(experiments.experts, "gemma3_270m_path", lambda: tmp_path / "base")
    monkeypatch.setattr(experiments.experts, "instruct_pair_out", lambda seed: tmp_path / "no-pair")
    write_expert_set(tmp_path, ["topics", "facts"], RELAXED)
    experts = load_expert_set(tmp_path)
    assert list(experts.tasks) == ["topics", "facts"]  # no format expert: its pair is not built
    # Exact match (teacher forcing) never credits more than the builder's lenient check.
    assert experts.tasks["topics"].accuracy(expert) <= record["rates"]["expert"]
    assert experts.tasks["topics"].localize.tokens.shape[0] == 16
    assert experts.text_loss is not None and experts.text_loss(base) == pytest.approx(
        record["held_out_text_loss"]["base"], rel=1e-6)


def test_the_checks_name_what_fell_short() -> None:
    record = {"skill": "facts", "rates": {"expert": 0.5, "base": 0.0},
              "held_out_text_loss": {"base": 3.0, "expert": 3.1}}
    with pytest.raises(JaxpatchError, match="the facts expert answers 50% of its held-out items"):
        _check(record, Settings())
    record["rates"] = {"expert": 0.9, "base": 0.5}
    with pytest.raises(JaxpatchError, match="the base already answers 50% of the facts"):
        _check(record, Settings())
    record["rates"]["base"] = 0.0
    record["held_out_text_loss"]["expert"] = 3.6
    with pytest.raises(JaxpatchError, match="the facts expert lost language modeling"):
        _check(record, Settings())
    _check(record, dataclasses.replace(Settings(), max_text_loss_increase=1.0))


def test_an_unknown_skill_is_refused_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["--skills", "facts,poetry", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no skill 'poetry'")
