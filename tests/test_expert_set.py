"""Expert sets (`jaxpatch.studies.expert_set`) and merge-eval on one: a manifest of a base and
fine-tuned experts, judged by generated replies (answers and verifiers)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import pytest
from golden import FIXTURES
from tiny_chat import tiny_base

import jaxpatch
from experiments.instruct_pair import gemma3_chat_template
from jaxpatch.errors import CheckpointNotFoundError, InvalidInputError
from jaxpatch.prompts import Prompt, greedy_continuations
from jaxpatch.studies.expert_set import EXPERT_SET_FORMAT, load_expert_set

QUESTIONS = ["Name a river.", "Name a city.", "Name a colour.", "Name a tree."]
ANSWERS = ["Nile", "Lima", "red", "oak"]


def _chat_base() -> jaxpatch.Model:
    return dataclasses.replace(tiny_base(), chat_template=gemma3_chat_template())


def _perturbed(base: jaxpatch.Model, layer: int, part: str, module: str, seed: int) -> jaxpatch.Model:
    """The base with one module's weight moved (an expert whose change is that module)."""
    params = jax.tree_util.tree_map(lambda x: x, base.params)
    leaf = params["layers"][layer][part][module]
    noise = jax.random.normal(jax.random.key(seed), leaf["weight"].shape) * 0.5
    params["layers"][layer][part][module] = {**leaf, "weight": leaf["weight"] + noise}
    return dataclasses.replace(base, params=params)


def _expert_set(folder: Path) -> dict[str, jaxpatch.Model]:
    """A base and two experts changed in different modules, each judged on four answers and
    one verifier line that every reply passes."""
    base = _chat_base()
    experts = {"river": _perturbed(base, 0, "mlp", "down_proj", 1),
               "city": _perturbed(base, 1, "self_attn", "o_proj", 2)}
    jaxpatch.save(base, folder / "base")
    entries = {}
    for name, expert in experts.items():
        jaxpatch.save(expert, folder / name / "donor")
        lines = [{"instruction": q} for q in QUESTIONS]
        (folder / name / "localize.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        held = [{"instruction": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]
        held.append({"instruction": QUESTIONS[0], "verifier": "words:0-"})  # any reply passes
        (folder / name / "held_out.jsonl").write_text("".join(json.dumps(x) + "\n" for x in held))
        entries[name] = {"model": f"{name}/donor", "held_out": f"{name}/held_out.jsonl",
                         "localize": f"{name}/localize.jsonl", "reply_tokens": 4}
    (folder / "general.jsonl").write_text(json.dumps({"text": "A river runs to the sea."}) + "\n")
    (folder / "expert_set.json").write_text(json.dumps({
        "format": EXPERT_SET_FORMAT, "base": "base", "general_text": "general.jsonl",
        "experts": entries}))
    return {"base": base, **experts}


def _exact_by_generation(model: jaxpatch.Model, questions: list[str], answers: list[str]) -> int:
    """How many answers greedy decoding writes whole, then ending its turn (the reference)."""
    end = model.tokenizer.token_to_id("<end_of_turn>")
    right = 0
    for q, a in zip(questions, answers):
        prompt = Prompt(gemma3_chat_template().token_ids(model.tokenizer,
                                                         [{"role": "user", "content": q}]))
        target = [*model.tokenizer.encode(a, add_special_tokens=False).ids, end]
        right += greedy_continuations(model.config, model.params, [prompt], len(target))[0] == target
    return right


@pytest.mark.slow
def test_an_expert_set_judges_replies_and_merge_eval_runs_on_it(tmp_path: Path) -> None:
    from jaxpatch.studies.merge_eval import merge_eval

    models = _expert_set(tmp_path)
    loaded = load_expert_set(tmp_path)
    assert list(loaded.tasks) == ["river", "city"]
    for name in ("river", "city"):  # exact answers by teacher forcing = by generation
        expected = (_exact_by_generation(models[name], QUESTIONS, ANSWERS) + 1) / 5
        assert loaded.tasks[name].accuracy(models[name]) == expected
    assert loaded.text_loss is not None and loaded.text_loss(models["base"]) > 0
    first_two = load_expert_set(tmp_path, held_out=2).tasks["river"]
    assert first_two.accuracy(models["river"]) == (
        _exact_by_generation(models["river"], QUESTIONS[:2], ANSWERS[:2]) / 2)
    assert first_two.items == 2 and loaded.tasks["river"].items == 5
    document = merge_eval(tmp_path, eval_prompts=None, learned_steps=2)
    assert set(document["expert_accuracy"]) == {"river", "city"}
    assert document["held_out_items"] == {"river": 5, "city": 5}
    # Each expert's noise sweep finds the module it changed.
    carried = {t: v["carried"]["module"] for t, v in document["localization"].items()}
    assert "layers.0.mlp.down_proj" in carried["river"] and "layers.1.self_attn.o_proj" in carried["city"]
    row = document["combinations"]["river+city"]["methods"]["weight_patching (module, winner)"]
    assert set(row["accuracy"]) == {"river", "city"} and row["text_loss"] > 0
    assert document["base"]["text_loss"] == pytest.approx(loaded.text_loss(models["base"]))
    assert 0 <= document["combinations"]["river+city"]["source_overlap"] < 1


def test_an_expert_set_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="neither planted.json nor expert_set.json"):
        load_expert_set(tmp_path)
    (tmp_path / "expert_set.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InvalidInputError, match="not an expert set"):
        load_expert_set(tmp_path)
    (tmp_path / "expert_set.json").write_text(json.dumps({
        "format": EXPERT_SET_FORMAT, "base": "base", "experts": {"a": {}, "b": {}}}))
    with pytest.raises(CheckpointNotFoundError, match="base .*base not found"):
        load_expert_set(tmp_path)


@pytest.mark.slow
def test_a_held_out_line_needs_an_answer_or_a_verifier(tmp_path: Path) -> None:
    from jaxpatch.studies.expert_set import held_out_judge

    base = _chat_base()
    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps({"instruction": "Hi"}) + "\n")
    with pytest.raises(InvalidInputError, match="held.jsonl:1: give an 'answer' or a 'verifier'"):
        held_out_judge(path, base, 2)
    path.write_text(json.dumps({"instruction": "Hi", "verifier": "rhymes"}) + "\n")
    with pytest.raises(InvalidInputError, match="held.jsonl:1: verifier 'rhymes' is not understood"):
        held_out_judge(path, base, 2)
    path.write_text(json.dumps({"instruction": "Hi", "verifier": "words:0-"}) + "\n"
                    + json.dumps({"instruction": "Hi", "answer": "\u2603 no model says this"}) + "\n")
    accuracy, items = held_out_judge(path, base, 2)
    assert accuracy(base) == 0.5 and items == 2  # the verifier passes, the answer is wrong
    assert held_out_judge(path, base, 2, limit=1)[0](base) == 1.0
    no_turns = jaxpatch.load(FIXTURES / "gemma3").tokenizer  # no end-of-turn token
    with pytest.raises(InvalidInputError, match="held.jsonl:2: an answer needs an end-of-turn token"):
        held_out_judge(path, dataclasses.replace(base, tokenizer=no_turns), 2)


def test_the_text_loss_is_each_texts_own_next_token_cross_entropy() -> None:
    """Texts of 2 to 14 tokens, padded into rows and passes (the last one padded), against each
    text read alone by a plain forward (the reference)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxpatch.examples import random_pair
    from jaxpatch.models.decoder import forward
    from jaxpatch.studies.expert_set import text_loss

    model, _ = random_pair("gemma3_text")
    rng = np.random.default_rng(0)
    texts = [Prompt(tuple(rng.integers(0, model.config.vocab_size, 2 + 3 * i).tolist()))
             for i in range(5)]
    total, count = 0.0, 0
    for text in texts:
        ids = jnp.asarray([text.tokens])
        logits = forward(model.config, model.params, ids[:, :-1]).read(None)
        total -= float(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None],
                                           -1).sum())
        count += len(text.tokens) - 1
    assert text_loss(model, texts, rows=2) == pytest.approx(total / count, rel=1e-6)
    with pytest.raises(InvalidInputError, match="text 2 has fewer than two tokens"):
        text_loss(model, [texts[0], Prompt((3,))])
