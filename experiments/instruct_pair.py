"""The paper's own setting on a real model: google/gemma-3-270m and an instruction-tuned donor
that follows verifiable format instructions, with no planted set.

1. **The base's own answers.** The base answers every question (`experiments.instructions`) as a
   plain continuation (`Question: ...\\nAnswer:`), greedily; the first sentences, cleaned, are
   its answer.
2. **Training data.** For each training question and each instruction, the user's message is the
   question followed by the instruction, rendered with Gemma 3's chat template, and the response
   is the base's answer transformed to satisfy the instruction, then `<end_of_turn>`: the donor
   learns the format, not new content.
3. **The donor.** Every weight of every block is trainable (norms included); the embeddings,
   which are also the output layer, stay frozen. Adam with warmup and cosine decay
   (`experiments.training.train`); the loss is the cross-entropy of the response tokens (the
   262,144-way output layer is computed only at those positions), plus a KL term holding the
   next-token distributions where the base has them, on general sentences and on the base's own
   plain answers (a few each step, in turn; the base's weights are the teacher). The data order is drawn from
   the seed, so a second seed gives a second donor for stability.
4. **Checks** (each fails the build in one line, exit status 2, nothing written): on held-out
   questions (topics never trained on), the donor's greedy responses satisfy each measured
   instruction at least `min_donor_rate` of the time and the base's at most `max_base_rate`
   (judged by `jaxpatch.verifiers`); the donor's loss on held-out plain text rises by at most
   `max_text_loss_increase` nats per token.

The folder holds `base/` and `donor/` (Hugging Face checkpoints with the tokenizer and the chat
template), `prompts/<instruction>.jsonl` (held-out questions with the instruction, as chat
`instruction` lines with the instruction's text as their `mark`) and `instruct.json` (settings,
checks, losses, how far each module moved).

    python -m experiments.instruct_pair --seed 0      # into the user cache
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.command import run_builder
from experiments.instructions import INSTRUCTIONS, Question, clean_answer, plain_prompt, questions
from experiments.planted_real import RETAIN, held_out_loss
from experiments.real_model import cache_dir, gemma3_270m_path
from experiments.training import Trained, text_kl, train, trainable_mask
from jaxpatch import Model, load, save
from jaxpatch.chat import ChatTemplate
from jaxpatch.components import select
from jaxpatch.engine.generation import greedy_replies
from jaxpatch.errors import JaxpatchError
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.models.model import pad_right
from jaxpatch.pair import delta_norms, weight_norms
from jaxpatch.prompts import Prompt
from jaxpatch.verifiers import reply_text, verifier_from_spec

__all__ = ["PAIR_FORMAT", "END_OF_TURN", "Settings", "gemma3_chat_template", "generate", "reply_text",
           "Examples", "examples", "response_loss", "FineTuning", "train_chat", "retained_texts",
           "relative_movement", "build", "write", "default_out", "main"]

PAIR_FORMAT = "jaxpatch.instruct/1"
END_OF_TURN = "<end_of_turn>"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What an instruction-tuned pair is built from (every field has a working default).

    Attributes:
        seed: draws the order of the training data (a second seed, a second donor).
        steps, lr, batch: Adam's steps, peak learning rate and examples per step.
        trainable: the selector of what the donor may change (every block; the embeddings,
            which are the output layer too, stay frozen).
        answer_tokens: tokens the base writes for its own answer.
        check_tokens: tokens each model writes when the instructions are checked.
        check_questions: held-out questions per instruction in the checks.
        min_donor_rate, max_base_rate: the share of held-out responses that must (donor) or may
            (base) satisfy each measured instruction.
        retain_text: weight of the KL term keeping the next-token distributions where the base
            has them, on general sentences (`experiments.planted_real.RETAIN`) and the base's
            own plain answers.
        retain_answers: how many of the base's plain answers the KL term reads per step, in
            turn.
        max_text_loss_increase: how far the donor's loss on held-out plain text may rise above
            the base's, in nats per token.
    """

    seed: int = 0
    steps: int = 300
    lr: float = 2e-5
    batch: int = 8
    trainable: str = "layers"
    answer_tokens: int = 32
    check_tokens: int = 48
    check_questions: int = 32
    retain_text: float = 16.0
    retain_answers: int = 2
    min_donor_rate: float = 0.9
    max_base_rate: float = 0.2
    max_text_loss_increase: float = 0.3


def gemma3_chat_template() -> ChatTemplate:
    """Gemma 3's chat template (as its instruction-tuned checkpoints publish it), with `<bos>`.

    Example:
        >>> gemma3_chat_template().render([{"role": "user", "content": "Hi"}])
        '<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
    """
    source = resources.files("experiments").joinpath("templates/gemma3.jinja").read_text()
    return ChatTemplate(source, (("bos_token", "<bos>"), ("eos_token", "<eos>")),
                        "Gemma 3 chat template")


def generate(model: Model, prompts: Sequence[Sequence[int]], n_tokens: int,
             batch: int = 32) -> list[list[int]]:
    """Greedy continuations of token-id prompts (`jaxpatch.engine.generation.greedy_replies`).

    Example:
        >>> m = jaxpatch.Model(cfg, base.params)
        >>> [len(c) for c in generate(m, [[1, 2], [3]], 3)]
        [3, 3]
    """
    return greedy_replies(model.config, model.params, [Prompt(tuple(p)) for p in prompts],
                          n_tokens, batch)


@dataclasses.dataclass(frozen=True)
class Examples:
    """Training examples as padded arrays (one width for all: one compiled step).

    Attributes:
        tokens: int32 `[n, width]`: chat prompt, response, `<end_of_turn>`, padding.
        mask: bool `[n, width]`.
        positions: int32 `[n, r]`: the positions whose next token is a response token.
        targets: int32 `[n, r]`: those tokens.
        weights: float32 `[n, r]`: 1 on real response tokens, 0 on padding.
    """

    tokens: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The rows as a batch tuple."""
        return (self.tokens[rows], self.mask[rows], self.positions[rows], self.targets[rows],
                self.weights[rows])


def examples(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Examples:
    """Padded arrays of (prompt ids, response ids) pairs; the response is predicted from the
    prompt's last token on.

    Example:
        >>> e = examples([([1, 2], [3, 4]), ([5], [6])])
        >>> e.tokens.tolist(), e.positions.tolist(), e.targets.tolist(), e.weights.tolist()
        ([[1, 2, 3, 4], [5, 6, 0, 0]], [[1, 2], [0, 0]], [[3, 4], [6, 0]], [[1.0, 1.0], [1.0, 0.0]])
    """
    width = max(len(p) + len(r) for p, r in pairs)
    span = max(len(r) for _, r in pairs)
    n = len(pairs)
    tokens = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), bool)
    positions = np.zeros((n, span), np.int32)
    targets = np.zeros((n, span), np.int32)
    weights = np.zeros((n, span), np.float32)
    for i, (prompt, response) in enumerate(pairs):
        seq = [*prompt, *response]
        tokens[i, :len(seq)] = seq
        mask[i, :len(seq)] = True
        k = len(response)
        positions[i, :k] = np.arange(len(prompt) - 1, len(prompt) - 1 + k)
        targets[i, :k] = response
        weights[i, :k] = 1.0
    return Examples(tokens, mask, positions, targets, weights)


def response_loss(config: ModelConfig, params: Params, batch: tuple[jax.Array, ...]) -> jax.Array:
    """Mean cross-entropy of the response tokens; the output layer runs only at the positions
    that predict them (`readout_positions`).

    Example:
        >>> e = examples([([1, 2], [3, 4])])
        >>> float(response_loss(cfg, base.params, e.take(np.arange(1)))) > 0
        True
    """
    tokens, mask, positions, targets, weights = batch
    logits = forward(config, params, tokens, mask, readout_positions=positions).read(None)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _batches(data: Examples, texts: np.ndarray, text_mask: np.ndarray, size: int, per_step: int,
             seed: int, base: Params) -> Iterator[tuple[Any, ...]]:
    """Batches in an order drawn from the seed, epoch after epoch: the examples, the general
    sentences with `per_step` of the base's own plain answers in turn (what the KL term holds),
    and the base's weights (the KL's teacher): every array an argument of the compiled step."""
    rng = np.random.default_rng([seed, 11])
    n, fixed = len(data.tokens), len(GENERAL_ROWS)
    rotating = np.arange(fixed, len(texts))
    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            kept = np.concatenate([np.arange(fixed), rng.choice(rotating, per_step, replace=False)])
            yield (*data.take(order[start:start + size]), texts[kept], text_mask[kept], base)


class FineTuning(Protocol):
    """What `train_chat` reads from a builder's settings (a frozen dataclass with these fields)."""

    @property
    def seed(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def batch(self) -> int: ...
    @property
    def trainable(self) -> str: ...
    @property
    def retain_text(self) -> float: ...
    @property
    def retain_answers(self) -> int: ...


def train_chat(base: Model, data: Examples, retained: tuple[np.ndarray, np.ndarray],
               s: FineTuning, label: str) -> Trained:
    """Fine-tunes the base on chat examples: the cross-entropy of the response tokens (the output
    layer only at the positions that predict them), plus `s.retain_text` times the KL divergence
    from the base's next-token distributions on the retained texts (the general sentences every
    step, `s.retain_answers` of the rest in turn; the base's weights, the teacher, are an
    argument of the compiled step). Adam with warmup and cosine decay (`train`).

    Arguments:
        base: the base model.
        data: the examples (`examples`).
        retained: the retained texts and their mask (`retained_texts`).
        s: the builder's settings (seed, steps, lr, batch, trainable, retain_text,
            retain_answers).
        label: the progress bar's name.

    Returns:
        The trained parameters and the losses (`experiments.training.Trained`).
    """
    config = base.config

    def loss(p: Params, batch: tuple[jax.Array, ...]) -> jax.Array:
        *responses, text, text_mask, teacher = batch
        next_token = lambda q: jax.nn.log_softmax(forward(config, q, text, text_mask).read(None), -1)
        return (response_loss(config, p, tuple(responses))
                + s.retain_text * text_kl(jax.lax.stop_gradient(next_token(teacher)),
                                          next_token(p), text_mask))

    texts, text_mask = retained
    batches = _batches(data, texts, text_mask, s.batch, s.retain_answers, s.seed, base.params)
    return train(base.params, loss, batches, s.steps, s.lr,
                 mask=trainable_mask(config, s.trainable), label=label)


# The general sentences, packed a few to a row (the output layer's cost is per position).
GENERAL_ROWS = tuple(" ".join(RETAIN[i:i + 4]) for i in range(0, len(RETAIN), 4))


def retained_texts(tokenizer: Any, plain: Sequence[Sequence[int]],
                   answers: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The texts the KL term holds the base's next-token distributions on: the general sentences
    (`experiments.planted_real.RETAIN`, every step) and each training question's plain prompt
    with the base's own answer (in turn), padded to one width."""
    general = [tokenizer.encode(t).ids for t in GENERAL_ROWS]
    return pad_right([*general, *[[*p, *a] for p, a in zip(plain, answers)]])


def _rates(model: Model, template: ChatTemplate, items: Sequence[Question],
           s: Settings) -> dict[str, float]:
    """Per measured instruction, the share of held-out responses that satisfy it."""
    tokenizer = model.tokenizer
    out = {}
    for item in INSTRUCTIONS:
        if not item.verifier:
            continue
        prompts = [template.token_ids(tokenizer, [{"role": "user", "content": item.message(q)}])
                   for q in items]
        verify = verifier_from_spec(item.verifier)
        replies = [reply_text(tokenizer, ids) for ids in generate(model, prompts, s.check_tokens)]
        out[item.name] = round(float(np.mean([verify(r) for r in replies])), 4)
    return out


def build(settings: Settings, base: Model | None = None, log: Callable[[str], None] = print) -> dict:
    """Builds the pair in memory (see the module docstring).

    Arguments:
        settings: the build.
        base: the base model (default: google/gemma-3-270m from `experiments.real_model`).
        log: where progress lines go.

    Returns:
        `{"base", "donor", "template", "prompts", "record"}`.

    Raises:
        JaxpatchError: a check failed (named in one line).
    """
    s = settings
    t0 = time.perf_counter()
    base = base or load(gemma3_270m_path())
    config, tokenizer = base.config, base.tokenizer
    if tokenizer is None:
        raise JaxpatchError("the instruction-tuned pair needs a base with a tokenizer")
    template = gemma3_chat_template()
    end = tokenizer.token_to_id(END_OF_TURN)
    end_ids = [end] if end is not None else tokenizer.encode(END_OF_TURN, add_special_tokens=False).ids

    train_qs, held_qs = questions("train"), questions("held-out")
    plain = [tokenizer.encode(plain_prompt(q)).ids for q in train_qs]
    generated = generate(base, plain, s.answer_tokens)
    answers = [clean_answer(tokenizer.decode(ids)) for ids in generated]
    kept = [(q, a) for q, a in zip(train_qs, answers) if a is not None]
    log(f"the base answered {len(kept)} of {len(train_qs)} training questions "
        f"({time.perf_counter() - t0:.0f}s)")
    pairs = []
    for question, answer in kept:
        for item in INSTRUCTIONS:
            prompt = template.token_ids(tokenizer, [{"role": "user", "content": item.message(question)}])
            response = tokenizer.encode(item.transform(answer, question), add_special_tokens=False).ids
            pairs.append((prompt, [*response, *end_ids]))
    data = examples(pairs)
    log(f"{len(pairs)} training examples, width {data.tokens.shape[1]}, responses up to "
        f"{data.targets.shape[1]} tokens")

    trained = train_chat(base, data, retained_texts(tokenizer, plain, generated), s,
                         "instruct donor")
    donor = Model(config, trained.params, tokenizer, chat_template=template)
    base = Model(config, base.params, tokenizer, chat_template=template)
    log(f"trained {trained.steps} steps, loss {trained.losses[0]} -> {trained.losses[-1]} "
        f"({time.perf_counter() - t0:.0f}s)")

    rng = np.random.default_rng([s.seed, 13])
    checked = [held_qs[i] for i in sorted(rng.choice(len(held_qs), min(s.check_questions,
                                                                        len(held_qs)), replace=False))]
    rates = {"donor": _rates(donor, template, checked, s), "base": _rates(base, template, checked, s)}
    text_loss = {"base": held_out_loss(config, base.params, tokenizer),
                 "donor": held_out_loss(config, donor.params, tokenizer)}
    log(f"instructions followed on held-out questions: donor {rates['donor']}, base {rates['base']}; "
        f"held-out text loss {text_loss['base']:.3f} -> {text_loss['donor']:.3f} "
        f"({time.perf_counter() - t0:.0f}s)")
    record = {
        "format": PAIR_FORMAT,
        "settings": {**dataclasses.asdict(s),
                     "model": "google/gemma-3-270m (Q4_K_M GGUF, dequantized to float32)",
                     "frozen": "embed_tokens (the tied output layer)"},
        "instructions": {i.name: {"text": i.text, "verifier": i.verifier} for i in INSTRUCTIONS},
        "data": {"train_questions": len(train_qs), "answered": len(kept), "examples": len(pairs),
                 "held_out_questions": len(held_qs), "checked_questions": len(checked)},
        "training": {"steps": trained.steps, "losses": trained.losses},
        "rates": rates, "held_out_text_loss": text_loss,
        "movement": relative_movement(config, base.params, donor.params),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _check(record, s)
    prompts = {i.name: [{"instruction": i.message(q), **({"mark": i.text} if i.text else {})}
                        for q in held_qs] for i in INSTRUCTIONS}
    return {"base": base, "donor": donor, "prompts": prompts, "record": record}


def _check(record: dict, s: Settings) -> None:
    """The build's checks, each refused in one line naming what fell short."""
    for name, rate in record["rates"]["donor"].items():
        if rate < s.min_donor_rate:
            raise JaxpatchError(f"the donor follows '{name}' in {rate:.0%} of held-out responses, "
                                f"below {s.min_donor_rate:.0%}: raise --steps or --lr")
    for name, rate in record["rates"]["base"].items():
        if rate > s.max_base_rate:
            raise JaxpatchError(f"the base already follows '{name}' in {rate:.0%} of held-out "
                                f"responses (at most {s.max_base_rate:.0%} allowed)")
    loss = record["held_out_text_loss"]
    if loss["donor"] > loss["base"] + s.max_text_loss_increase:
        raise JaxpatchError(f"the donor lost language modeling: held-out loss {loss['donor']:.3f} vs "
                            f"the base's {loss['base']:.3f} nats/token (allowed: "
                            f"+{s.max_text_loss_increase}); lower --lr or --steps")


def relative_movement(config: ModelConfig, base: Params, donor: Params) -> dict[str, float]:
    """Each module's relative movement, |dW| / |W| of the base (0 for a module of zero norm).

    Example:
        >>> relative_movement(cfg, base.params, base.params)["layers.0.mlp.up_proj"]
        0.0
    """
    modules = select(config, None, "module")
    moved, size = delta_norms(config, base, donor, modules), weight_norms(config, base, modules)
    return {c.name: round(float(d / w), 6) if w else 0.0 for c, d, w in zip(modules, moved, size)}


def write(built: dict, out: str | Path, overwrite: bool = False) -> None:
    """Writes `base/`, `donor/`, the prompts and `instruct.json` into `out`, atomically."""
    from jaxpatch.runs.atomic import atomic_directory

    with atomic_directory(out, overwrite=overwrite) as tmp:
        save(built["base"], tmp / "base")
        save(built["donor"], tmp / "donor")
        (tmp / "prompts").mkdir()
        for name, messages in built["prompts"].items():
            (tmp / "prompts" / f"{name}.jsonl").write_text("".join(
                json.dumps(line, ensure_ascii=False) + "\n" for line in messages))
        (tmp / "instruct.json").write_text(json.dumps(built["record"], indent=1) + "\n")


def default_out(seed: int) -> Path:
    """The cache folder a pair of this seed is built into by default."""
    return cache_dir().parent / "pairs" / f"gemma3-270m-instruct-seed{seed}"


def main(argv: Sequence[str] | None = None) -> int:
    """The build command (`python -m experiments.instruct_pair --help`)."""
    return run_builder(argv, "python -m experiments.instruct_pair", __doc__, Settings, build, write,
                       default_out)


if __name__ == "__main__":
    sys.exit(main())

