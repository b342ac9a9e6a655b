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
        either an `answer` (the reply's first line must equal it: `answer_matches`) or a
        `verifier` (a `jaxpatch.verifiers` spec the reply must satisfy). `localize` lines are
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
from jaxpatch.models.model import Model
from jaxpatch.prompts import Batch, Prompt, make_batch, read_prompts

__all__ = ["EXPERT_SET_FORMAT", "Task", "ExpertSet", "load_expert_set", "text_loss",
           "held_out_judge"]

EXPERT_SET_FORMAT = "jaxpatch.expert-set/1"


@dataclasses.dataclass(frozen=True)
class Task:
    """One expert of a set and what it is judged by.

    Attributes:
        expert: the fine-tuned model.
        localize: the batch its localization reads (`positions="targets"`: the tokens the
            expert should write are each prompt's target).
        accuracy: the share of the task's held-out items a model gets right.
    """

    expert: Model
    localize: Batch
    accuracy: Callable[[Model], float]


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
                    lambda model: task_accuracy(config, model.params, evals))

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
        judge = held_out_judge(_path(folder, entry, "held_out", where), expert, n_tokens,
                               held_out)
        tasks[str(name)] = Task(expert, batch, judge)
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
                   limit: int | None = None) -> Callable[[Model], float]:
    """A held-out file as a function of the model: the share of its lines whose greedy reply
    (`n_tokens` at most, up to the end of the turn) is right.

    Arguments:
        path: prompt lines with an `answer` or a `verifier` each.
        expert: the expert (its tokenizer and chat template render the prompts).
        n_tokens: tokens each reply may have.
        limit: judge the first `limit` lines only (None: all).

    Returns:
        model -> accuracy.

    Raises:
        InvalidInputError: a line with neither or both, or an unknown verifier (file and line).
    """
    from jaxpatch.engine.generation import greedy_replies
    from jaxpatch.verifiers import answer_matches, reply_text, verifier_from_spec

    prompts = read_prompts(path, expert.tokenizer, expert.chat_template)[:limit]
    checks: list[Callable[[str], bool]] = []
    lines = [line for line in path.read_text().split("\n") if line.strip()][:limit]
    for number, line in enumerate(lines, 1):
        item = json.loads(line)
        where = f"{path}:{number}"
        if ("answer" in item) == ("verifier" in item):
            raise InvalidInputError(f"{where}: give an 'answer' or a 'verifier', one of them")
        if "answer" in item:
            if not isinstance(item["answer"], str):
                raise InvalidInputError(f"{where}: 'answer' must be a string")
            checks.append(lambda text, a=item["answer"]: answer_matches(text, a))
        else:
            try:
                verify = verifier_from_spec(str(item["verifier"]))
            except InvalidInputError as e:
                raise InvalidInputError(f"{where}: {e}") from None
            checks.append(lambda text, v=verify: v(text) >= 1.0)

    def accuracy(model: Model) -> float:
        replies = greedy_replies(model.config, model.params, prompts, n_tokens)
        return float(np.mean([check(reply_text(expert.tokenizer, r))
                              for check, r in zip(checks, replies)]))

    return accuracy


def text_loss(model: Model, texts: Sequence[Prompt]) -> float:
    """Mean next-token cross-entropy in nats over every predicted token of the texts, each
    text read alone.

    Arguments:
        model: the model.
        texts: token-id prompts (`read_prompts` of `text` lines).

    Returns:
        The loss.

    Example:
        >>> text_loss(jaxpatch.Model(cfg, base.params), [Prompt((1, 2, 3))]) > 0
        True
    """
    from jaxpatch.models.decoder import forward

    total, count = 0.0, 0
    for text in texts:
        ids = jnp.asarray([text.tokens])
        logits = forward(model.config, model.params, ids[:, :-1]).read(None)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None], -1)
        total -= float(picked.sum())
        count += ids.shape[1] - 1
    return total / max(count, 1)
