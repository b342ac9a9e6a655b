"""A set of experts fine-tuned from one base, each with what it is judged by: what `merge_eval`
reads.

Two kinds of folder hold one:

    a planted pair with experts (`jaxpatch/studies/pairs/default`, `planted.json`): each task
        judged by the exact match of greedy continuations with its eval prompts' targets, and
        localized on its patching prompts' targets

    an expert set (`expert_set.json`, written by `python -m experiments.experts`):

        {"format": "jaxpatch.expert-set/1",
         "base": "PATH",                                 the base checkpoint
         "general_text": "FILE",                         optional: `text` lines, the general
                                                         language-modeling loss of each merge
         "experts": {"TASK": {"model": "PATH",           the expert's checkpoint
                              "held_out": "FILE",        what it is judged on
                              "localize": "FILE",        what it is localized on
                              "reply_tokens": 24}}}      tokens each judged reply may have

        Paths are relative to the folder. `held_out` lines are prompt lines (`read_prompts`:
        `text`, `messages` or `instruction`, rendered with the expert's chat template) with
        either an `answer` (right when greedy decoding writes exactly the answer's tokens and
        then ends its turn: exact match, computed by teacher forcing in one forward pass, which
        picks the same tokens greedy decoding would) or a `verifier` (a `jaxpatch.verifiers`
        spec the greedy reply of at most `reply_tokens` tokens must satisfy). `localize` lines are
        prompt lines; each is scored on the expert's own greedy reply (log-probability of the
        reply's tokens, up to the end of its turn), so localization needs no answers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.errors import CheckpointNotFoundError, InvalidInputError
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.model import Model
from jaxpatch.prompts import Batch, Prompt, make_batch, read_prompts
from jaxpatch.rounding import jit

__all__ = ["EXPERT_SET_FORMAT", "Task", "ExpertSet", "load_expert_set", "text_loss",
           "held_out_judge", "exact_matches"]

EXPERT_SET_FORMAT = "jaxpatch.expert-set/1"


@dataclasses.dataclass(frozen=True)
class Task:
    """One expert of a set and what it is judged by.

    Attributes:
        expert: the fine-tuned model.
        localize: the batch its localization reads (`positions="targets"`: the tokens the
            expert should write are each prompt's target).
        accuracy: the share of the task's held-out items a model gets right.
        items: how many held-out items it judges (one item is `1 / items` of accuracy).
    """

    expert: Model
    localize: Batch
    accuracy: Callable[[Model], float]
    items: int


@dataclasses.dataclass(frozen=True)
class ExpertSet:
    """Experts fine-tuned from one base.

    Attributes:
        folder: where the set was read from.
        base: the base model.
        tasks: task name -> `Task`, in the folder's order.
        text_loss: a model's general language-modeling loss in nats per token (None: the set
            has no general text).
    """

    folder: Path
    base: Model
    tasks: dict[str, Task]
    text_loss: Callable[[Model], float] | None


def load_expert_set(folder: str | Path, held_out: int | None = None) -> ExpertSet:
    """Reads an expert set: a planted pair with experts, or an `expert_set.json` folder.

    Arguments:
        folder: the folder.
        held_out: judge each task on its first `held_out` items only (None: all).

    Returns:
        The set.

    Raises:
        CheckpointNotFoundError: the folder holds neither `planted.json` nor `expert_set.json`,
            or a file it names is missing.
        InvalidInputError: a malformed manifest or held-out line (naming file and line).

    Example:
        >>> from jaxpatch.studies.evaluate import default_pair_dir
        >>> sorted(load_expert_set(default_pair_dir()).tasks)
        ['map', 'reverse', 'sort']
    """
    folder = Path(folder)
    if (folder / "planted.json").is_file():
        return _planted_set(folder, held_out)
    manifest = folder / "expert_set.json"
    if not manifest.is_file():
        raise CheckpointNotFoundError(f"{folder}: neither planted.json nor expert_set.json "
                                      "(merge-eval reads a planted pair with experts or an "
                                      "expert set)")
    return _manifest_set(manifest, held_out)


def _planted_set(folder: Path, held_out: int | None) -> ExpertSet:
    """A planted pair's donor and experts, judged by their eval prompts' exact answers."""
    from jaxpatch.io import load
    from jaxpatch.studies.evaluate import load_planted, task_accuracy

    pair = load_planted(folder)
    experts = {pair.task: pair.donor}
    for key, record in pair.record.get("models", {}).items():
        if key.startswith("experts/"):
            experts[str(record["task"])] = load(pair.folder / key)
    config = pair.base.config

    def task(name: str, expert: Model) -> Task:
        prompts = read_prompts(folder / "prompts" / f"{name}.jsonl")
        evals = read_prompts(folder / "prompts" / f"{name}-eval.jsonl")[:held_out]
        return Task(expert, make_batch(config, prompts, "targets"),
                    lambda model: task_accuracy(config, model.params, evals), len(evals))

    return ExpertSet(folder, pair.base, {n: task(n, e) for n, e in experts.items()}, None)


def _manifest_set(manifest: Path, held_out: int | None) -> ExpertSet:
    """The set an `expert_set.json` describes."""
    from jaxpatch.io import load

    folder = manifest.parent
    try:
        record = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{manifest}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or record.get("format") != EXPERT_SET_FORMAT:
        raise InvalidInputError(f"{manifest}: not an expert set (format {EXPERT_SET_FORMAT!r})")
    entries = record.get("experts")
    if not isinstance(entries, dict) or len(entries) < 2:
        raise InvalidInputError(f"{manifest}: 'experts' must name at least two experts")
    base = load(_path(folder, record, "base", manifest))
    tasks = {}
    for name, entry in entries.items():
        where = f"{manifest}: expert {name!r}"
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{where} must be an object")
        expert = load(_path(folder, entry, "model", where))
        n_tokens = entry.get("reply_tokens", 32)
        if not (isinstance(n_tokens, int) and n_tokens >= 1):
            raise InvalidInputError(f"{where}: 'reply_tokens' must be a whole number from 1")
        template = expert.chat_template or base.chat_template
        localize = read_prompts(_path(folder, entry, "localize", where), expert.tokenizer,
                                template)
        localize = [dataclasses.replace(p, target=tuple(r))
                    for p, r in zip(localize, _replies(expert, localize, n_tokens))]
        batch = make_batch(base.config, localize, "targets")
        judge, items = held_out_judge(_path(folder, entry, "held_out", where), expert, n_tokens,
                                      held_out)
        tasks[str(name)] = Task(expert, batch, judge, items)
    general = record.get("general_text")
    loss = None
    if general is not None:
        texts = read_prompts(_path(folder, record, "general_text", manifest), base.tokenizer)
        loss = functools.partial(text_loss, texts=texts)
    return ExpertSet(folder, base, tasks, loss)


def _path(folder: Path, entry: dict[str, Any], key: str, where: Any) -> Path:
    """A path an entry names, relative to the folder, checked to exist."""
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{where}: needs {key!r}, a path")
    path = folder / value
    if not path.exists():
        raise CheckpointNotFoundError(f"{where}: {key} {path} not found")
    return path


def _replies(model: Model, prompts: Sequence[Prompt], n_tokens: int) -> list[list[int]]:
    """Greedy replies, cut after the first end-of-turn token (what a chat turn writes)."""
    from jaxpatch.engine.generation import greedy_replies
    from jaxpatch.verifiers import reply_length

    out = greedy_replies(model.config, model.params, prompts, n_tokens)
    return [r[:max(1, reply_length(model.tokenizer, r))] for r in out]


def held_out_judge(path: Path, expert: Model, n_tokens: int,
                   limit: int | None = None) -> tuple[Callable[[Model], float], int]:
    """A held-out file as a function of the model: the share of its lines a model gets right
    (an `answer` line by exact match, a `verifier` line by its greedy reply of at most
    `n_tokens` tokens, up to the end of the turn).

    Arguments:
        path: prompt lines with an `answer` or a `verifier` each.
        expert: the expert (its tokenizer and chat template render the prompts).
        n_tokens: tokens each verified reply may have.
        limit: judge the first `limit` lines only (None: all).

    Returns:
        `(model -> accuracy, the number of items judged)`.

    Raises:
        InvalidInputError: a line with neither or both, or an unknown verifier (file and line);
            answers with a tokenizer that has no end-of-turn token.
    """
    from jaxpatch.engine.generation import greedy_replies
    from jaxpatch.verifiers import END_OF_TURN_MARKERS, reply_text, verifier_from_spec

    tokenizer = expert.tokenizer
    prompts = read_prompts(path, tokenizer, expert.chat_template)[:limit]
    lines = [line for line in path.read_text().split("\n") if line.strip()][:limit]
    answered: list[Prompt] = []
    verified: list[tuple[Prompt, Callable[[str], float]]] = []
    ends = [i for i in map(tokenizer.token_to_id, END_OF_TURN_MARKERS) if i is not None]
    for number, (line, prompt) in enumerate(zip(lines, prompts), 1):
        item = json.loads(line)
        where = f"{path}:{number}"
        if ("answer" in item) == ("verifier" in item):
            raise InvalidInputError(f"{where}: give an 'answer' or a 'verifier', one of them")
        if "answer" in item:
            if not (isinstance(item["answer"], str) and item["answer"]):
                raise InvalidInputError(f"{where}: 'answer' must be a non-empty string")
            if not ends:
                raise InvalidInputError(f"{where}: an answer needs an end-of-turn token, and the "
                                        "tokenizer has none of " + ", ".join(END_OF_TURN_MARKERS))
            answer = tokenizer.encode(item["answer"], add_special_tokens=False).ids
            answered.append(dataclasses.replace(prompt, target=(*answer, ends[0])))
        else:
            try:
                verified.append((prompt, verifier_from_spec(str(item["verifier"]))))
            except InvalidInputError as e:
                raise InvalidInputError(f"{where}: {e}") from None
    batch = make_batch(expert.config, answered, "targets") if answered else None

    def accuracy(model: Model) -> float:
        right = exact_matches(model, batch) if batch is not None else 0
        if verified:
            replies = greedy_replies(model.config, model.params, [p for p, _ in verified],
                                     n_tokens)
            right += sum(verify(reply_text(tokenizer, r)) >= 1.0
                         for (_, verify), r in zip(verified, replies))
        return right / len(lines)

    return accuracy, len(lines)


def exact_matches(model: Model, batch: Batch, rows: int = 16) -> int:
    """How many prompts of a "targets" batch a model completes exactly: the greedy token at
    every target position is the target (teacher forcing; so greedy decoding writes the whole
    target).

    Arguments:
        model: the model.
        batch: prompts with targets (`make_batch(..., "targets")`).
        rows: prompts per forward pass (the last pass padded with repeats: one program).

    Returns:
        The count.

    Example:
        >>> from jaxpatch.prompts import greedy_continuations
        >>> prompts = [Prompt((1, 2), target=tuple(greedy_continuations(cfg, base.params,
        ...            [Prompt((1, 2))], 2)[0])), Prompt((3,), target=(0, 0))]
        >>> exact_matches(jaxpatch.Model(cfg, base.params), make_batch(cfg, prompts, "targets"))
        1
    """
    n = batch.tokens.shape[0]
    right = 0
    for start in range(0, n, rows):
        take = np.minimum(np.arange(start, start + rows), n - 1)
        picked = np.asarray(_greedy_at(model.config, model.params, batch.tokens[take],
                                       batch.mask[take], batch.positions[take]))
        hit = (picked == np.asarray(batch.targets[take])) | (np.asarray(batch.weights[take]) == 0)
        right += int(hit.all(axis=1)[: min(rows, n - start)].sum())
    return right


@functools.partial(jit, static_argnums=0)
def _greedy_at(config: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array,
               positions: jax.Array) -> jax.Array:
    """The greedy token at each readout position (`[rows, q]`)."""
    from jaxpatch.models.decoder import forward

    logits = forward(config, params, tokens, mask, readout_positions=positions).read(None)
    return jnp.argmax(logits, axis=-1)


def text_loss(model: Model, texts: Sequence[Prompt], rows: int = 8) -> float:
    """Mean next-token cross-entropy in nats over every predicted token of the texts, each
    text read alone (right-padded rows, one compiled program for the whole set).

    Arguments:
        model: the model.
        texts: token-id prompts (`read_prompts` of `text` lines), each of at least two tokens.
        rows: texts per forward pass (the last pass padded with repeats: one program).

    Returns:
        The loss.

    Raises:
        InvalidInputError: a text of fewer than two tokens (nothing to predict).

    Example:
        >>> text_loss(jaxpatch.Model(cfg, base.params), [Prompt((1, 2, 3))]) > 0
        True
    """
    short = [i for i, t in enumerate(texts, 1) if len(t.tokens) < 2]
    if short:
        raise InvalidInputError(f"text {short[0]} has fewer than two tokens: nothing to predict")
    # The first token as the prompt and the rest as its target: a "targets" batch reads the
    # positions that predict every later token.
    batch = make_batch(model.config, [Prompt(t.tokens[:1], target=t.tokens[1:]) for t in texts],
                       "targets")
    n = batch.tokens.shape[0]
    total, count = 0.0, 0.0
    for start in range(0, n, rows):
        take = np.minimum(np.arange(start, start + rows), n - 1)
        real = (np.asarray(batch.weights[take]) > 0) & (np.arange(rows) < n - start)[:, None]
        picked = np.asarray(_target_log_probs(model.config, model.params, batch.tokens[take],
                                              batch.mask[take], batch.positions[take],
                                              batch.targets[take]))
        total -= float((picked * real).sum())
        count += float(real.sum())
    return total / max(count, 1.0)


@functools.partial(jit, static_argnums=0)
def _target_log_probs(config: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array,
                      positions: jax.Array, targets: jax.Array) -> jax.Array:
    """The log-probability of each target at its readout position (`[rows, q]`)."""
    from jaxpatch.models.decoder import forward

    logits = forward(config, params, tokens, mask, readout_positions=positions).read(None)
    return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                               targets[..., None], -1)[..., 0]
