"""Prompts: reading the JSON Lines file, batching, readout positions, donor continuations.

A prompts file has one JSON object per line:

    {"text": "The capital of France is", "target": " Paris", "foil": " London"}
    {"tokens": [464, 3139, 286], "target_tokens": [6342], "foil_tokens": [3576]}
    {"messages": [{"role": "system", "content": "Answer in capitals."},
                  {"role": "user", "content": "Name a colour."}], "target": "RED"}
    {"instruction": "Name a colour, in capitals.", "chat_template_kwargs": {"enable_thinking": false}}

`text` is tokenized with the base checkpoint's tokenizer; `tokens` are used as given (and win
over a `text` beside them, kept for people to read); chat
`messages` (or an `instruction`, one user message) are rendered with a chat template
(`jaxpatch.chat`) with the assistant's turn opened, and `chat_template_kwargs` are that line's
template variables. `target`/`foil` (or `target_tokens`/`foil_tokens`) are what `logit-diff` and
`logprob` read. `mark` (a text or chat line) names a part of the prompt, e.g. the instruction:
the tokens overlapping its last occurrence in the prompt's text are marked, for weight patches
restricted to them (`patch_at="marked"`, see `patch_where`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.chat import ChatTemplate
from jaxpatch.errors import InvalidInputError, PromptsError
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.models.model import check_tokens
from jaxpatch.modes import PATCH_AT, POSITIONS, PatchAt, Positions, check_mode
from jaxpatch.rounding import jit

__all__ = ["Prompt", "Batch", "read_prompts", "make_batch", "prompt_buffer", "greedy_continuations",
           "token_roles", "patch_where", "marked_positions", "PROMPT_TOKEN", "MARKED_TOKEN",
           "LAST_PROMPT_TOKEN", "AFTER_PROMPT", "MAX_PROMPTS_BYTES", "MAX_LINE_BYTES"]

_LOG = logging.getLogger("jaxpatch")

MAX_PROMPTS_BYTES = 1024**3  # a prompts file is read whole: refuse what cannot be meant
MAX_LINE_BYTES = 4 * 1024**2  # one prompt (with its target and foil), as JSON


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids and, optionally, target and foil token ids and the positions
    of its marked tokens (`patch_at="marked"`).

    Example:
        >>> Prompt((1, 2, 3), target=(4,)).target
        (4,)
    """

    tokens: tuple[int, ...]
    target: tuple[int, ...] | None = None
    foil: tuple[int, ...] | None = None
    marked: tuple[int, ...] = ()


# What each position of a batch is (bit flags of `Batch.roles`, `token_roles`).
PROMPT_TOKEN, MARKED_TOKEN, LAST_PROMPT_TOKEN, AFTER_PROMPT = 1, 2, 4, 8


class Batch(NamedTuple):
    """A right-padded batch with the positions a metric reads (a pytree).

    Attributes:
        tokens: int32 `[P, S]`.
        mask: bool `[P, S]`, True on real tokens.
        positions: int32 `[P, Q]`: the positions whose outputs the metric reads.
        weights: float32 `[P, Q]`: each prompt's weights over its positions (sum to 1; 0 on
            padding).
        targets: int32 `[P, Q]`: the token the metric reads at each position (-1: none).
        foils: int32 `[P, Q]`: the foil token at each position (-1: none).
        roles: int8 `[P, S]`: what each position is (`token_roles`): where position-restricted
            patches apply (`patch_where`).
    """

    tokens: jax.Array
    mask: jax.Array
    positions: jax.Array
    weights: jax.Array
    targets: jax.Array
    foils: jax.Array
    roles: jax.Array


def read_prompts(path: str | os.PathLike[str], tokenizer: Any = None,
                 chat_template: ChatTemplate | None = None) -> list[Prompt]:
    """Reads a prompts JSON Lines file.

    Arguments:
        path: the file.
        tokenizer: a `tokenizers.Tokenizer` for `text` lines (None: only `tokens` lines).
        chat_template: renders `messages` and `instruction` lines (None: such lines are refused).

    Returns:
        The prompts, in file order.

    Raises:
        PromptsError: a missing or empty file, or a malformed line (with its line number).

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "p.jsonl"
        >>> _ = f.write_text('{"tokens": [1, 2], "target_tokens": [3]}\\n')
        >>> read_prompts(f)
        [Prompt(tokens=(1, 2), target=(3,), foil=None, marked=())]
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PROMPTS_BYTES:
            raise PromptsError(f"{path}: {path.stat().st_size} bytes is more than the "
                               f"{MAX_PROMPTS_BYTES} a prompts file may have")
        lines = path.read_bytes().split(b"\n")
    except (FileNotFoundError, IsADirectoryError):
        raise PromptsError(f"{path}: prompts file not found") from None
    text = []
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_BYTES:
            raise PromptsError(f"{path}:{number}: a line of {len(line)} bytes is longer than "
                               f"the {MAX_LINE_BYTES} a prompt may have")
        try:
            text.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PromptsError(f"{path}:{number}: not UTF-8 text ({e.reason})") from None
    prompts = [_parse_line(path, n, line, tokenizer, chat_template)
               for n, line in enumerate(text, 1) if line.strip()]
    if not prompts:
        raise PromptsError(f"{path}: no prompts (the file is empty)")
    return prompts


def _parse_line(path: Path, number: int, line: str, tokenizer: Any,
                chat_template: ChatTemplate | None) -> Prompt:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptsError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise PromptsError(f"{where}: the JSON nests too deeply") from None
    if not isinstance(item, dict):
        raise PromptsError(f"{where}: expected a JSON object with 'text', 'tokens', 'messages' or "
                           "'instruction'")

    def ids(text_key: str, tokens_key: str, required: bool) -> tuple[int, ...] | None:
        if tokens_key in item:
            value = item[tokens_key]
            if not (isinstance(value, list) and value
                    and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31
                            for t in value)):
                raise PromptsError(f"{where}: {tokens_key!r} must be a non-empty list of "
                                   "token ids (integers from 0)")
            return tuple(value)
        if text_key in item:
            if not isinstance(item[text_key], str):
                raise PromptsError(f"{where}: {text_key!r} must be a string")
            if tokenizer is None:
                raise PromptsError(f"{where}: {text_key!r} needs a tokenizer, but the base "
                                   "checkpoint has no tokenizer.json; give token ids instead")
            encoded = tuple(tokenizer.encode(item[text_key], add_special_tokens=text_key == "text").ids)
            if not encoded:
                raise PromptsError(f"{where}: {text_key!r} tokenizes to nothing")
            _warn_unknown(where, text_key, encoded, tokenizer)
            return encoded
        if required:
            raise PromptsError(f"{where}: needs 'text', 'tokens', 'messages' or 'instruction'")
        return None

    chat = [key for key in ("messages", "instruction") if key in item]
    if chat and len([key for key in ("text", "tokens", *chat) if key in item]) > 1:
        others = [key for key in ("text", "tokens", "messages", "instruction") if key in item]
        raise PromptsError(f"{where}: give chat 'messages' or an 'instruction' alone, not "
                           f"{' and '.join(map(repr, others))}")
    prompt = _chat_ids(where, item, tokenizer, chat_template) if chat else ids("text", "tokens", True)
    marked: tuple[int, ...] = ()
    if "mark" in item:
        marked = _marked(where, item, tuple(prompt or ()), tokenizer, chat_template)
    return Prompt(prompt, ids("target", "target_tokens", False),  # type: ignore[arg-type]
                  ids("foil", "foil_tokens", False), marked)


def _marked(where: str, item: dict[str, Any], prompt: tuple[int, ...], tokenizer: Any,
            chat_template: ChatTemplate | None) -> tuple[int, ...]:
    """The positions a line's `mark` names in its prompt (a text or chat line)."""
    part = item["mark"]
    if not (isinstance(part, str) and part):
        raise PromptsError(f"{where}: 'mark' must be a non-empty string (a part of the prompt)")
    if "tokens" in item or tokenizer is None:
        raise PromptsError(f"{where}: 'mark' needs a 'text', 'messages' or 'instruction' line")
    if "text" in item:
        text, specials = item["text"], True
    else:
        messages = ([{"role": "user", "content": item["instruction"]}] if "instruction" in item
                    else item["messages"])
        assert chat_template is not None  # _chat_ids refused the line otherwise
        text = chat_template.render(messages, add_generation_prompt=True,
                                    **item.get("chat_template_kwargs", {}))
        specials = False
    try:
        positions = marked_positions(tokenizer, text, part, add_special_tokens=specials)
    except InvalidInputError as e:
        raise PromptsError(f"{where}: {e}") from None
    assert tokenizer.encode(text, add_special_tokens=specials).ids == list(prompt)
    return positions


def marked_positions(tokenizer: Any, text: str, part: str, *,
                     add_special_tokens: bool = False) -> tuple[int, ...]:
    """The positions of the tokens of `text` that overlap the last occurrence of `part` in it
    (e.g. an instruction inside a rendered chat prompt).

    Arguments:
        tokenizer: a `tokenizers.Tokenizer`.
        text: the prompt's text, as it is tokenized.
        part: the text to mark.
        add_special_tokens: as `text` is tokenized (a plain text line: True; a rendered chat
            prompt: False).

    Returns:
        Token positions, ascending.

    Raises:
        InvalidInputError: `part` does not occur in `text`.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> tok = Tokenizer(models.WordLevel({"say": 0, "hi": 1, "in": 2, "caps": 3}, "say"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> marked_positions(tok, "say hi in caps", "in caps")
        (2, 3)
    """
    start = text.rfind(part)
    if start < 0:
        raise InvalidInputError(f"the mark {part!r} does not occur in the prompt")
    end = start + len(part)
    offsets = tokenizer.encode(text, add_special_tokens=add_special_tokens).offsets
    return tuple(i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a)


def _chat_ids(where: str, item: dict[str, Any], tokenizer: Any,
              chat_template: ChatTemplate | None) -> tuple[int, ...]:
    """A `messages` or `instruction` line rendered with the chat template and tokenized."""
    if "instruction" in item:
        if not isinstance(item["instruction"], str):
            raise PromptsError(f"{where}: 'instruction' must be a string")
        messages = [{"role": "user", "content": item["instruction"]}]
    else:
        messages = item["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)):
            raise PromptsError(f"{where}: 'messages' must be a non-empty list of objects with a "
                               "string 'role' and 'content'")
    variables = item.get("chat_template_kwargs", {})
    if not isinstance(variables, dict):
        raise PromptsError(f"{where}: 'chat_template_kwargs' must be an object")
    if chat_template is None:
        raise PromptsError(f"{where}: chat messages need a chat template, and the model has none; "
                           "give one with --chat-template FILE")
    if tokenizer is None:
        raise PromptsError(f"{where}: chat messages need a tokenizer, but the checkpoint has no "
                           "tokenizer.json")
    try:
        encoded = chat_template.token_ids(tokenizer, messages, **variables)
    except InvalidInputError as e:
        raise PromptsError(f"{where}: {e}") from None
    if not encoded:
        raise PromptsError(f"{where}: the chat template renders the messages as nothing")
    return encoded


def _warn_unknown(where: str, key: str, ids: tuple[int, ...], tokenizer: Any) -> None:
    """Warns (once per line) when most of a text's tokens are the tokenizer's unknown token:
    the text is probably not in the model's vocabulary (`"hello world"` on a toy tokenizer)."""
    unk = getattr(getattr(tokenizer, "model", None), "unk_token", None)
    unk_id = tokenizer.token_to_id(unk) if isinstance(unk, str) else None
    unknown = sum(i == unk_id for i in ids) if unk_id is not None else 0
    if unknown and unknown * 2 >= len(ids):
        _LOG.warning("jaxpatch: %s: %d of the %d tokens of %r are unknown to the tokenizer (%s): "
                     "is the text in the model's vocabulary?", where, unknown, len(ids), key, unk)


def make_batch(config: ModelConfig, prompts: Sequence[Prompt], positions: Positions = "last",
               continuations: Sequence[Sequence[int]] | None = None) -> Batch:
    """Builds a right-padded `Batch` with the positions a metric reads.

    Arguments:
        config: the architecture (to validate token ids and lengths).
        prompts: the prompts.
        positions: "last" (the last prompt token), "prompt" (every prompt token),
            "continuation" (the tokens of `continuations`, appended after each prompt) or
            "targets" (each prompt's target tokens appended, reading the positions that
            predict them: for log-probability metrics).
        continuations: per prompt, the generated tokens (for "continuation").

    Returns:
        The batch.

    Example:
        >>> b = make_batch(ModelConfig.tiny("llama"), [Prompt((1, 2, 3)), Prompt((4,))])
        >>> b.positions.tolist(), b.mask.sum(1).tolist()
        ([[2], [0]], [3, 1])
    """
    check_mode("positions", positions, POSITIONS, InvalidInputError)
    append_targets = positions == "targets"
    rows, spans = [], []
    for i, p in enumerate(prompts):
        extra: Sequence[int] = ()
        if append_targets:
            if p.target is None:
                raise PromptsError(f"prompt {i + 1} has no target, which this metric needs")
            extra = p.target
        elif positions == "continuation":
            if continuations is None:
                raise InvalidInputError("positions='continuation' needs the donor's continuations")
            extra = tuple(continuations[i])
        row = list(p.tokens) + list(extra)
        rows.append(row)
        if append_targets:  # position t-1 predicts token t
            spans.append(list(range(len(p.tokens) - 1, len(row) - 1)))
        elif positions == "last":
            spans.append([len(p.tokens) - 1])
        elif positions == "prompt":
            spans.append(list(range(len(p.tokens))))
        else:
            spans.append(list(range(len(p.tokens), len(row))))
        if not spans[-1]:
            raise PromptsError(f"prompt {i + 1} has no positions to read for {positions!r}")
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = True
    check_tokens(config, tokens)
    q = max(len(s) for s in spans)
    pos = np.zeros((len(rows), q), np.int32)
    weights = np.zeros((len(rows), q), np.float32)
    targets = np.full((len(rows), q), -1, np.int32)
    foils = np.full((len(rows), q), -1, np.int32)
    for i, span in enumerate(spans):
        pos[i, : len(span)] = span
        weights[i, : len(span)] = 1.0 / len(span)
        if append_targets:
            targets[i, : len(span)] = [int(tokens[i, s + 1]) for s in span]
        else:
            p = prompts[i]
            if p.target is not None:
                targets[i, 0] = p.target[0]
            if p.foil is not None:
                foils[i, 0] = p.foil[0]
    for name, ids in (("target", targets), ("foil", foils)):
        if (ids >= config.vocab_size).any():
            raise PromptsError(f"a {name} token id is out of range for the vocabulary of "
                               f"{config.vocab_size}")
    roles = token_roles(prompts, width)
    return Batch(*(jnp.asarray(a) for a in (tokens, mask, pos, weights, targets, foils, roles)))


def token_roles(prompts: Sequence[Prompt], width: int) -> np.ndarray:
    """What each position of right-padded prompts is, as bit flags: `PROMPT_TOKEN`,
    `MARKED_TOKEN` (a position the prompt marks), `LAST_PROMPT_TOKEN` (the position that
    writes the first response token), `AFTER_PROMPT` (every position after the prompt to the
    buffer's end: appended targets, a continuation, generated tokens, padding).

    Arguments:
        prompts: the prompts.
        width: the buffer's width (at least the longest prompt).

    Returns:
        int8 `[len(prompts), width]`.

    Raises:
        PromptsError: a marked position outside its prompt.

    Example:
        >>> token_roles([Prompt((7, 8, 9), marked=(1,))], 5).tolist()
        [[1, 3, 5, 8, 8]]
    """
    roles = np.zeros((len(prompts), width), np.int8)
    for i, p in enumerate(prompts):
        n = len(p.tokens)
        roles[i, :n] = PROMPT_TOKEN
        roles[i, n - 1] |= LAST_PROMPT_TOKEN
        roles[i, n:] = AFTER_PROMPT
        if any(not 0 <= m < n for m in p.marked):
            raise PromptsError(f"prompt {i + 1} marks a position outside its {n} tokens")
        roles[i, list(p.marked)] |= MARKED_TOKEN
    return roles


def patch_where(roles: jax.Array | np.ndarray, at: PatchAt) -> jax.Array | None:
    """Where a position-restricted weight patch applies (`MixedWeight.where`), from the
    positions' roles (`token_roles`).

    Arguments:
        roles: int8 `[P, S]`.
        at: "everywhere" (None: the patch is not restricted), "prompt" (the prompt before its
            last token: what reads the instruction), "response" (the last prompt token and
            every position after it: what writes the response), "first-response" (the last
            prompt token alone: what writes the first response token) or "marked" (the
            prompt's marked tokens).

    Returns:
        float32 `[P, S]` of 0 and 1, or None.

    Example:
        >>> roles = token_roles([Prompt((7, 8, 9), marked=(0,))], 5)
        >>> [patch_where(roles, at).tolist()[0] for at in ("prompt", "response", "marked")]
        [[1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]]
    """
    check_mode("patch positions", at, PATCH_AT, InvalidInputError)
    if at == "everywhere":
        return None
    r = jnp.asarray(roles).astype(jnp.int32)
    last = (r & LAST_PROMPT_TOKEN) != 0
    chosen = {"prompt": ((r & PROMPT_TOKEN) != 0) & ~last,
              "response": last | ((r & AFTER_PROMPT) != 0),
              "first-response": last,
              "marked": (r & MARKED_TOKEN) != 0}[at]
    return chosen.astype(jnp.float32)


@functools.partial(jit, static_argnums=0)
def _next_tokens(config: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array,
                 last: jax.Array) -> jax.Array:
    out = forward(config, params, tokens, mask, readout_positions=last[:, None])
    return jnp.argmax(out.read(None)[:, 0], axis=-1).astype(jnp.int32)


def prompt_buffer(config: ModelConfig, prompts: Sequence[Prompt],
                  n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts in a buffer with room for `n_tokens` more, and their lengths.

    Raises:
        InvalidInputError: no prompts, a length below 1, or a buffer longer than the context.

    Example:
        >>> tokens, lengths = prompt_buffer(cfg, [Prompt((1, 2, 3)), Prompt((4,))], 2)
        >>> tokens.tolist(), lengths.tolist()
        ([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]], [3, 1])
    """
    if n_tokens < 1 or not prompts:
        raise InvalidInputError(f"generation needs prompts and at least 1 token, got "
                                f"{len(prompts)} prompts and {n_tokens} tokens")
    lengths = np.array([len(p.tokens) for p in prompts], np.int32)
    width = int(lengths.max()) + n_tokens
    if width > config.max_position_embeddings:
        raise InvalidInputError(f"prompt plus {n_tokens} generated tokens ({width}) is longer "
                                f"than the model's context of {config.max_position_embeddings}")
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p.tokens)] = p.tokens
    return tokens, lengths


def greedy_continuations(config: ModelConfig, params: Params, prompts: Sequence[Prompt],
                         n_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt by a model (used with positions="continuation").

    Arguments:
        config: the architecture.
        params: the model that continues (the donor).
        prompts: the prompts.
        n_tokens: how many tokens to generate per prompt.

    Returns:
        Per prompt, the generated token ids.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import init_params
        >>> cfg = ModelConfig.tiny("llama")
        >>> out = greedy_continuations(cfg, init_params(cfg, jax.random.key(0)), [Prompt((1, 2))], 3)
        >>> len(out[0])
        3
    """
    tokens, lengths = prompt_buffer(config, prompts, n_tokens)
    width = tokens.shape[1]
    for step in range(n_tokens):
        current = lengths + step
        mask = np.arange(width)[None, :] < current[:, None]
        new = np.asarray(_next_tokens(config, params, jnp.asarray(tokens), jnp.asarray(mask),
                                      jnp.asarray(current - 1)))
        tokens[np.arange(len(prompts)), current] = new
    return [tokens[i, lengths[i]: lengths[i] + n_tokens].tolist() for i in range(len(prompts))]
