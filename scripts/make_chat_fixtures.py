"""Generates the chat-template golden fixtures in tests/fixtures/chat from transformers.

The templates are the ones the models publish in their `tokenizer_config.json` (Gemma 3
instruction-tuned, Llama 3.2 Instruct, Qwen3 with its thinking switch, OLMo 2 Instruct), kept as
`<name>.jinja` beside this file's output. For each, a folder `<name>/` holds the
`tokenizer_config.json` a checkpoint would carry (the template and the special tokens), and
`cases.json` holds conversations (with and without a system message, several turns, template
variables) with transformers' `apply_chat_template(..., add_generation_prompt=True)`: the text
and the token ids, on the small shared `tokenizer.json` (the fixture tokenizer with each
template's markers added as special tokens).

Needs the `reference` extra:  pip install -e ".[reference]"
Run:                          python scripts/make_chat_fixtures.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from make_fixtures import make_tokenizer

OUT = Path(__file__).parent.parent / "tests" / "fixtures" / "chat"
SPECIAL = {
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "olmo2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
}
MARKERS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
           "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<think>",
           "</think>"]
USER = {"role": "user", "content": "the quick brown fox"}
SYSTEM = {"role": "system", "content": "  a patch is a pytree  "}
CONVERSATIONS: list[tuple[list[dict[str, str]], dict[str, Any]]] = [
    ([USER], {}),
    ([SYSTEM, USER], {}),
    ([USER, {"role": "assistant", "content": "jumps over the lazy dog"},
      {"role": "user", "content": "weight patching copies weights"}], {}),
    ([SYSTEM, USER, {"role": "assistant", "content": "<think>\nsources\n</think>\n\nthe donor"},
      {"role": "user", "content": "a hierarchy of components "}], {}),
]
VARIABLES = {"llama3": {"date_string": "26 Jul 2024"}}  # else today's date (strftime_now)
EXTRA = {"qwen3": [([USER], {"enable_thinking": False})]}


def main() -> None:
    import transformers  # pyright: ignore[reportMissingImports]  (the reference extra)

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens(MARKERS)
    tokenizer.save(str(OUT / "tokenizer.json"))
    cases = []
    for name, special in SPECIAL.items():
        source = (OUT / f"{name}.jinja").read_text()
        folder = OUT / name
        folder.mkdir(exist_ok=True)
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": source, **special}, indent=2, sort_keys=True) + "\n")
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(OUT / "tokenizer.json"),
                                                    **special)
        fast.chat_template = source
        for messages, variables in CONVERSATIONS + EXTRA.get(name, []):
            variables = {**VARIABLES.get(name, {}), **variables}
            text = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            **variables)
            ids = fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           **variables)
            if not isinstance(ids, list):  # transformers 5 returns the encoding
                ids = ids["input_ids"]  # pyright: ignore[reportIndexIssue, reportArgumentType]
            cases.append({"template": name, "messages": messages, "variables": variables,
                          "text": text, "ids": list(ids)})
            print(f"{name}: {len(ids)} tokens: {text!r}")
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    (OUT / "VERSIONS.json").write_text(json.dumps(
        {"transformers": transformers.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
