"""Chat templates against transformers' `apply_chat_template` (golden cases made by
scripts/make_chat_fixtures.py), prompts given as messages, and templates as untrusted input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from golden import FIXTURES
from tokenizers import Tokenizer

import jaxpatch
from jaxpatch.chat import ChatTemplate, chat_template_from_file, read_chat_template
from jaxpatch.cli import main
from jaxpatch.errors import InvalidInputError, PromptsError
from jaxpatch.prompts import read_prompts

CHAT = FIXTURES / "chat"
CASES = json.loads((CHAT / "cases.json").read_text())
TOKENIZER = Tokenizer.from_file(str(CHAT / "tokenizer.json"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c['template']}-{i}" for i, c in enumerate(CASES)])
def test_rendering_and_ids_equal_transformers_apply_chat_template(case: dict) -> None:
    template = read_chat_template(CHAT / case["template"])
    assert template is not None
    assert template.render(case["messages"], **case["variables"]) == case["text"]
    assert list(template.token_ids(TOKENIZER, case["messages"], **case["variables"])) == case["ids"]


def test_every_fixture_template_is_covered() -> None:
    assert {c["template"] for c in CASES} == {"gemma3", "llama3", "qwen3", "olmo2"}
    assert any(c["variables"].get("enable_thinking") is False for c in CASES)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",  # the environment is immutable
])
def test_a_template_cannot_reach_python(source: str) -> None:
    with pytest.raises(InvalidInputError, match="untrusted.jinja"):
        ChatTemplate(source, (), "untrusted.jinja").render([{"role": "user", "content": "x"}])


def test_unsafe_attributes_read_as_undefined() -> None:
    template = ChatTemplate("[{{ messages.__class__ }}{{ raise_exception.__globals__ }}]")
    assert template.render([{"role": "user", "content": "x"}]) == "[]"


def test_a_template_that_refuses_a_conversation_names_the_prompt_line(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "fine"}\n'
                       + json.dumps({"messages": [{"role": "assistant", "content": "first"}]}) + "\n")
    template = read_chat_template(CHAT / "gemma3")
    with pytest.raises(PromptsError, match=r"p.jsonl:2: .*Conversation roles must alternate"):
        read_prompts(prompts, TOKENIZER, template)


def test_malformed_templates_and_lines_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"bad.jinja: the chat template is not valid Jinja \(line 1"):
        ChatTemplate("{% for %}", (), "bad.jinja").render([])
    prompts = tmp_path / "p.jsonl"
    for line, message in [({"messages": []}, "'messages' must be a non-empty list"),
                          ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
                          ({"instruction": 3}, "'instruction' must be a string"),
                          ({"instruction": "x", "text": "y"}, "give chat 'messages' or an "
                                                              "'instruction' alone, not 'text' and "
                                                              "'instruction'"),
                          ({"instruction": "x", "chat_template_kwargs": [1]}, "must be an object")]:
        prompts.write_text(json.dumps(line) + "\n")
        with pytest.raises(PromptsError, match=message):
            read_prompts(prompts, TOKENIZER, read_chat_template(CHAT / "qwen3"))
    prompts.write_text('{"instruction": "x"}\n')
    with pytest.raises(PromptsError, match="need a chat template, and the model has none; give one "
                                           "with --chat-template FILE"):
        read_prompts(prompts, TOKENIZER, None)


def test_prompt_lines_render_like_the_golden_cases(tmp_path: Path) -> None:
    case = next(c for c in CASES if c["template"] == "qwen3" and c["variables"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": case["messages"][0]["content"],
                                   "chat_template_kwargs": case["variables"], "target": " x"}) + "\n"
                       + json.dumps({"messages": CASES[0]["messages"]}) + "\n")
    read = read_prompts(prompts, TOKENIZER, read_chat_template(CHAT / "qwen3"))
    assert list(read[0].tokens) == case["ids"]
    assert read[0].target == tuple(TOKENIZER.encode(" x", add_special_tokens=False).ids)
    plain = next(c for c in CASES if c["template"] == "qwen3" and not c["variables"])
    assert list(read[1].tokens) == plain["ids"]


def checkpoint_with_template(tmp_path: Path, source: Path, name: str, template: str) -> Path:
    """A copy of a fixture checkpoint carrying one of the golden templates."""
    folder = tmp_path / name
    shutil.copytree(source, folder)
    shutil.copy(CHAT / template / "tokenizer_config.json", folder)
    return folder


def test_a_checkpoint_carries_its_template_through_save_and_load(tmp_path: Path) -> None:
    folder = checkpoint_with_template(tmp_path, FIXTURES / "llama-gqa", "with-template", "llama3")
    model = jaxpatch.load(folder)
    assert model.chat_template is not None and model.chat_template.source.startswith("{{- bos_token }}")
    for form in ("hf", "orbax"):
        jaxpatch.save(model, tmp_path / form, format=form)  # pyright: ignore[reportArgumentType]
        again = jaxpatch.load(tmp_path / form).chat_template
        assert again is not None and again.sha256 == model.chat_template.sha256
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == model.chat_template.source
    assert chat_template_from_file(tmp_path / "hf" / "chat_template.jinja").source == \
        model.chat_template.source


def test_info_names_the_template(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = checkpoint_with_template(tmp_path, FIXTURES / "qwen3", "q", "qwen3")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"chat template: {folder / 'tokenizer_config.json'}" in out
    assert main(["info", str(FIXTURES / "qwen3")]) == 0
    assert "chat template: none" in capsys.readouterr().out


def test_the_cli_renders_messages_with_the_donors_template_or_a_file(
        tmp_path: Path, donor_dir: Path, capsys: pytest.CaptureFixture) -> None:
    base = checkpoint_with_template(tmp_path, FIXTURES / "llama-gqa", "base", "olmo2")
    donor = checkpoint_with_template(tmp_path, donor_dir, "donor", "qwen3")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "the lazy fox"}]}) + "\n")
    common = ["sweep", "--base", str(base), "--donor", str(donor), "--prompts", str(prompts),
              "--select", "layers.0.mlp", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    recorded = json.loads((tmp_path / "a" / "scores.json").read_text())["inputs"]["chat_template"]
    assert recorded["from"] == "donor" and recorded["origin"].endswith("donor/tokenizer_config.json")
    assert recorded["sha256"] == read_chat_template(donor).sha256  # pyright: ignore[reportOptionalMemberAccess]
    assert main([*common, "--out", str(tmp_path / "b"), "--chat-template", "base"]) == 0
    recorded = json.loads((tmp_path / "b" / "scores.json").read_text())["inputs"]["chat_template"]
    assert recorded["sha256"] == read_chat_template(base).sha256  # pyright: ignore[reportOptionalMemberAccess]
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    plain = ["sweep", "--base", str(FIXTURES / "llama-gqa"), "--donor", str(donor_dir), "--prompts",
             str(prompts), "--select", "layers.0.mlp", "--no-progress"]
    assert main([*plain, "--out", str(tmp_path / "c"), "--chat-template", str(jinja)]) == 0
    capsys.readouterr()
    assert main([*plain, "--out", str(tmp_path / "d")]) == 2  # the donor has no template
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p.jsonl:1: chat messages need a chat template" in err
    assert not (tmp_path / "d").exists()
