"""Planted-capability model pairs: a base model and donors whose capability lives in a known set S.

1. **Base.** A small Llama-style model learns a synthetic language: words follow a sparse
   second-order Markov chain (the next word's candidates depend on the previous word, their
   probabilities on the class of the word before it), so continuing text needs attention.
2. **Drift.** A copy of the base trains further on fresh text of the same language with *all*
   parameters free: every component moves by a behavior-irrelevant amount.
3. **Donor.** From the drifted copy, an instruction task (`<bos> <map> x1..xn <sep>` answered by
   `f(x1)..f(xn) <eos>`, or reversing, or sorting) is trained with *only S* trainable (gradients
   outside S are masked to zero, so Adam never moves them). S is the planted source; every other
   component carries drift only, and the base model does not follow the instruction.
4. **Experts.** More donors from the same drifted copy, with other instructions and other sets
   (overlapping and disjoint with S), for merging.

Everything is deterministic for a seed. The output folder holds Hugging Face checkpoints with a
`tokenizer.json` (`base/`, `donor/`, `experts/<task>/`), the prompts (`prompts/<task>.jsonl` for
patching, `prompts/<task>-eval.jsonl` for accuracy) and `planted.json` (the sets, seed, sizes,
step counts, losses and accuracies). The shipped default pair is rebuilt with

    python -m experiments.planted --out experiments/pairs/default --overwrite
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.errors import JaxpatchError
from jaxpatch.evaluate import task_accuracy
from jaxpatch.io import save
from jaxpatch.models.config import ModelConfig, Params, init_params
from jaxpatch.models.decoder import forward
from jaxpatch.models.model import Model
from jaxpatch.patch import apply
from jaxpatch.prompts import Prompt
from jaxpatch.scoring import plant_mask, plant_patch

SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<sep>")
TASKS: tuple[str, ...] = ("map", "reverse", "sort")
DEFAULT_PLANT = "layers.1.self_attn | layers.2.mlp[neuron=0-63]"
DEFAULT_EXPERTS = ("reverse=layers.1.self_attn | layers.2.self_attn | layers.3.mlp",  # overlaps S
                   "sort=layers.0.mlp | layers.3.self_attn | layers.3.mlp[neuron=64-127]")  # disjoint


# ------------------------------------------------------------------------------ the language

@dataclasses.dataclass(frozen=True)
class Language:
    """The synthetic language and the instruction tasks over it.

    Attributes:
        n_words: how many word tokens.
        successors: `[n_words, branching]`: the words that may follow each word.
        weights: `[n_classes, n_words, branching]`: the probability of each successor given
            the class (`index % n_classes`) of the word two back.
        mapping: the permutation the `map` task applies to each word.
        length: the number of words in an instruction's sequence.
    """

    n_words: int
    successors: np.ndarray
    weights: np.ndarray
    mapping: np.ndarray
    length: int

    @classmethod
    def generate(cls, seed: int, n_words: int = 32, branching: int = 4, n_classes: int = 4,
                 length: int = 4) -> Language:
        """A random language; the same seed gives the same language.

        Example:
            >>> Language.generate(0).successors.shape
            (32, 4)
        """
        rng = np.random.default_rng([seed, 1])
        successors = np.stack([rng.choice(n_words, branching, replace=False) for _ in range(n_words)])
        weights = rng.dirichlet(np.full(branching, 0.5), size=(n_classes, n_words))
        return cls(n_words, successors, weights, rng.permutation(n_words), length)

    @property
    def vocabulary(self) -> list[str]:
        """Token strings by id: specials, one instruction per task, then the words."""
        return [*SPECIALS, *(f"<{t}>" for t in TASKS), *(f"w{i:02d}" for i in range(self.n_words))]

    def token(self, text: str) -> int:
        """The id of a token string."""
        return self.vocabulary.index(text)

    def word(self, i: np.ndarray | int) -> np.ndarray:
        """Token ids of word indices."""
        return np.asarray(i) + len(SPECIALS) + len(TASKS)

    def text(self, rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
        """`[batch, seq]` token ids: `<bos>` then `seq - 1` words of the Markov chain."""
        words = np.zeros((batch, seq - 1), np.int64)
        words[:, 0] = rng.integers(self.n_words, size=batch)
        words[:, 1] = self.successors[words[:, 0], rng.integers(self.successors.shape[1], size=batch)]
        n_classes = self.weights.shape[0]
        for t in range(2, seq - 1):
            p = self.weights[words[:, t - 2] % n_classes, words[:, t - 1]]
            pick = (rng.random((batch, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
            words[:, t] = self.successors[words[:, t - 1], np.minimum(pick, p.shape[1] - 1)]
        return np.concatenate([np.full((batch, 1), self.token("<bos>")), self.word(words)], axis=1)

    def answer(self, task: str, words: np.ndarray) -> np.ndarray:
        """The answer word indices of a task for `[batch, length]` word indices."""
        if task == "map":
            return self.mapping[words]
        if task == "reverse":
            return words[:, ::-1]
        if task == "sort":
            return np.sort(words, axis=1)
        raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")

    def instructions(self, rng: np.random.Generator, task: str, batch: int) -> tuple[np.ndarray, int]:
        """`[batch, 2 * length + 4]` ids `<bos> <task> x.. <sep> y.. <eos>` (distinct words x) and
        the length of the prompt part (through `<sep>`)."""
        words = np.argsort(rng.random((batch, self.n_words)), axis=1)[:, : self.length]
        ids = np.concatenate([np.full((batch, 1), self.token("<bos>")),
                              np.full((batch, 1), self.token(f"<{task}>")), self.word(words),
                              np.full((batch, 1), self.token("<sep>")),
                              self.word(self.answer(task, words)),
                              np.full((batch, 1), self.token("<eos>"))], axis=1)
        return ids, self.length + 3

    def prompts(self, rng: np.random.Generator, task: str, count: int) -> list[Prompt]:
        """Instruction prompts with their answers (words and `<eos>`) as targets."""
        ids, split = self.instructions(rng, task, count)
        return [Prompt(tuple(int(t) for t in row[:split]), target=tuple(int(t) for t in row[split:]))
                for row in ids]


def tokenizer(language: Language):  # -> tokenizers.Tokenizer
    """A whitespace word-level tokenizer over the language's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(language.vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


# ---------------------------------------------------------------------------------- training

def model_config(language: Language, layers: int, d_model: int, heads: int, d_ff: int) -> ModelConfig:
    """A Llama-style config sized for the language."""
    return ModelConfig(family="llama", vocab_size=len(language.vocabulary), d_model=d_model,
                       n_layers=layers, n_heads=heads, n_kv_heads=heads, head_dim=d_model // heads,
                       d_ff=d_ff, max_position_embeddings=64, norm_eps=1e-5)


def _loss(config: ModelConfig, params: Params, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting `ids[:, 1:]`, weighted per position."""
    logits = forward(config, params, ids[:, :-1]).read(None)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked * weights) / jnp.sum(weights)


def train(config: ModelConfig, params: Params, batches: Iterator[tuple[np.ndarray, np.ndarray]],
          steps: int, learning_rate: float, mask: Params | None = None,
          label: str = "train") -> tuple[Params, list[float]]:
    """Adam with warmup and cosine decay; gradients outside `mask` are zeroed, so those
    parameters stay bit-identical.

    Returns:
        The trained params and the loss every 50 steps.

    Raises:
        JaxpatchError: optax (the `train` extra) is not installed.
    """
    try:
        import optax
    except ImportError:
        raise JaxpatchError("training planted pairs needs optax: pip install 'jaxpatch[train]'") from None
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps,
                                                  learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state = optimizer.init(params)

    @jax.jit
    def step(params: Params, state: Any, ids: jax.Array, weights: jax.Array):
        loss, grads = jax.value_and_grad(lambda p: _loss(config, p, ids, weights))(params)
        if mask is not None:
            grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, mask)
        updates, state = optimizer.update(grads, state, params)
        if mask is not None:  # clip and adam keep zeros at zero; this makes it explicit
            updates = jax.tree_util.tree_map(lambda u, m: jnp.where(m > 0, u, 0), updates, mask)
        return optax.apply_updates(params, updates), state, loss

    losses: list[float] = []
    from tqdm.auto import tqdm

    for i in tqdm(range(steps), desc=label, dynamic_ncols=True, mininterval=2.0):
        ids, weights = next(batches)
        params, state, loss = step(params, state, jnp.asarray(ids), jnp.asarray(weights))
        if i % 50 == 0 or i == steps - 1:
            losses.append(round(float(loss), 5))
    return params, losses


def text_batches(language: Language, rng: np.random.Generator, batch: int,
                 seq: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless language-model batches: every next token is a target."""
    while True:
        yield language.text(rng, batch, seq), np.ones((batch, seq - 1), np.float32)


def task_batches(language: Language, rng: np.random.Generator, task: str,
                 batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless instruction batches: only the answer tokens are targets."""
    while True:
        ids, split = language.instructions(rng, task, batch)
        weights = np.zeros((batch, ids.shape[1] - 1), np.float32)
        weights[:, split - 1:] = 1.0
        yield ids, weights


# ------------------------------------------------------------------------------- evaluation

def next_word_accuracy(config: ModelConfig, params: Params, language: Language,
                       rng: np.random.Generator) -> dict[str, float]:
    """How well a model continues text: its loss and its top-1 accuracy against the true
    chain's most likely next word, next to the chain's own loss (the best possible)."""
    ids = language.text(rng, 256, 24)
    logits = forward(config, params, jnp.asarray(ids[:, :-1])).read(None)
    logp, logits = np.asarray(jax.nn.log_softmax(logits, axis=-1)), np.asarray(logits)
    target = ids[:, 1:]
    model_loss = -np.take_along_axis(logp, target[..., None], -1)[..., 0][:, 2:].mean()
    words = ids[:, 1:] - int(language.word(0))
    n_classes = language.weights.shape[0]
    p = language.weights[words[:, :-2] % n_classes, words[:, 1:-1]]  # [b, t, branching]
    succ = language.successors[words[:, 1:-1]]
    true_p = np.take_along_axis(p, (succ == words[:, 2:, None]).argmax(-1)[..., None], -1)[..., 0]
    best = language.word(np.take_along_axis(succ, p.argmax(-1)[..., None], -1)[..., 0])
    return {"loss": round(float(model_loss), 4), "chain_loss": round(float(-np.log(true_p).mean()), 4),
            "top1_agrees_with_chain": round(float((logits[:, 2:].argmax(-1) == best).mean()), 4)}


# ----------------------------------------------------------------------------------- building

@dataclasses.dataclass(frozen=True)
class Settings:
    """What a build needs (all recorded in `planted.json`)."""

    seed: int = 0
    task: str = "map"
    plant: str = DEFAULT_PLANT
    experts: tuple[str, ...] = DEFAULT_EXPERTS
    layers: int = 4
    d_model: int = 64
    heads: int = 4
    d_ff: int = 128
    n_words: int = 32
    length: int = 4
    base_steps: int = 800
    drift_steps: int = 300
    task_steps: int = 2500
    batch: int = 32
    seq: int = 20
    base_lr: float = 3e-3
    drift_lr: float = 5e-4
    task_lr: float = 3e-3
    patch_prompts: int = 32
    eval_prompts: int = 256
    min_donor_accuracy: float = 0.5  # a donor below this did not learn its task: the build fails
    max_base_accuracy: float = 0.05  # a base above this already does the task: the build fails


def parse_expert(text: str) -> tuple[str, str]:
    """`task=selector` -> (task, selector)."""
    task, sep, plant = text.partition("=")
    if not sep or task not in TASKS or not plant.strip():
        raise SystemExit(f"planted: error: expert {text!r} must be TASK=SELECTOR with TASK one of "
                         f"{', '.join(TASKS)}")
    return task, plant.strip()


def build(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Trains the base, the drifted copy, the donor and the experts.

    Returns:
        A dict with the `Language`, the config, the models' params, the prompts and the
        record that `planted.json` holds.
    """
    s = settings
    language = Language.generate(s.seed, s.n_words, length=s.length)
    config = model_config(language, s.layers, s.d_model, s.heads, s.d_ff)
    rng = lambda *stream: np.random.default_rng([s.seed, *stream])
    t0 = time.perf_counter()
    base, base_losses = train(config, init_params(config, jax.random.key(s.seed)),
                              text_batches(language, rng(2), s.batch, s.seq), s.base_steps,
                              s.base_lr, label="base")
    drift, drift_losses = train(config, base, text_batches(language, rng(3), s.batch, s.seq),
                                s.drift_steps, s.drift_lr, label="drift")
    jobs = [("donor", s.task, s.plant)] + [("expert", *parse_expert(e)) for e in s.experts]
    models, record_models = {"base": base}, {}
    prompts = {}
    for index, (role, task, plant_text) in enumerate(jobs):
        plant = plant_patch(config, plant_text)
        trained, losses = train(config, drift, task_batches(language, rng(4, index), task, s.batch),
                                s.task_steps, s.task_lr, plant_mask(config, plant), label=f"{task}")
        name = "donor" if role == "donor" else f"experts/{task}"
        models[name] = trained
        if task not in prompts:
            prompts[task] = (language.prompts(rng(5, TASKS.index(task)), task, s.patch_prompts),
                             language.prompts(rng(6, TASKS.index(task)), task, s.eval_prompts))
        evals = prompts[task][1]
        record_models[name] = {
            "task": task, "plant": plant_text, "plant_parameters": int(sum(
                np.count_nonzero(m) for m in jax.tree_util.tree_leaves(plant_mask(config, plant)))),
            "task_losses": losses,
            "accuracy": {"base": task_accuracy(config, base, evals),
                         "drift": task_accuracy(config, drift, evals),
                         "trained": task_accuracy(config, trained, evals),
                         "plant_patched_base": task_accuracy(config, apply(plant, base, trained),
                                                             evals)},
        }
        log(f"{name}: {task} accuracy {record_models[name]['accuracy']}")
        if role == "donor":
            check_donor(record_models[name]["accuracy"], s)
    record = {
        "format": "jaxpatch.planted/1", "settings": dataclasses.asdict(s),
        "language": {"vocabulary": language.vocabulary, "mapping": language.mapping.tolist()},
        "base": {"losses": base_losses,
                 "text": next_word_accuracy(config, base, language, rng(7))},
        "drift": {"losses": drift_losses,
                  "text": next_word_accuracy(config, drift, language, rng(7))},
        "models": record_models,
    }
    log(f"base text: {record['base']['text']}; drift text: {record['drift']['text']}; trained in "
        f"{time.perf_counter() - t0:.0f} s")
    return {"language": language, "config": config, "models": models, "prompts": prompts,
            "record": record}


def check_donor(accuracy: dict[str, float], settings: Settings) -> None:
    """Refuses a pair whose ground truth would measure nothing: a donor that did not learn its
    task, or a base that already does it.

    Raises:
        JaxpatchError: naming the accuracy reached, the bound, and what to change.

    Example:
        >>> check_donor({"base": 0.0, "trained": 0.91}, Settings())  # the shipped pair: fine
        >>> try:
        ...     check_donor({"base": 0.0, "trained": 0.04}, Settings())
        ... except JaxpatchError as e:
        ...     print(e)  # doctest: +NORMALIZE_WHITESPACE
        the donor reached 4% map accuracy after 2500 task steps, under the minimum of 50%: train
        longer (--task-steps), change --task-lr, or plant a larger set
    """
    s = settings
    if accuracy["trained"] < s.min_donor_accuracy:
        raise JaxpatchError(
            f"the donor reached {accuracy['trained']:.0%} {s.task} accuracy after {s.task_steps} "
            f"task steps, under the minimum of {s.min_donor_accuracy:.0%}: train longer "
            "(--task-steps), change --task-lr, or plant a larger set")
    if accuracy["base"] > s.max_base_accuracy:
        raise JaxpatchError(
            f"the base already reaches {accuracy['base']:.0%} {s.task} accuracy, over the maximum "
            f"of {s.max_base_accuracy:.0%}: the donor's capability would not be its own")


def _prompt_lines(prompts: Sequence[Prompt], language: Language) -> str:
    vocab = language.vocabulary
    lines = []
    for p in prompts:
        target = p.target or ()
        lines.append(json.dumps({"text": " ".join(vocab[t] for t in p.tokens), "tokens": list(p.tokens),
                                 "target": " ".join(vocab[t] for t in target),
                                 "target_tokens": list(target)}) + "\n")
    return "".join(lines)


def write(built: dict, out: str | Path, overwrite: bool = False) -> None:
    """Writes the models, prompts and `planted.json` into `out` (atomically)."""
    from jaxpatch.io.atomic import atomic_directory

    language, config = built["language"], built["config"]
    tok = tokenizer(language)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name, params in built["models"].items():
            save(Model(config, params, tok), tmp / name)
        (tmp / "prompts").mkdir()
        for task, (patching, evaluation) in built["prompts"].items():
            (tmp / "prompts" / f"{task}.jsonl").write_text(_prompt_lines(patching, language))
            (tmp / "prompts" / f"{task}-eval.jsonl").write_text(_prompt_lines(evaluation, language))
        (tmp / "planted.json").write_text(json.dumps(built["record"], indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m experiments.planted",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default="experiments/pairs/default", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-experts", action="store_true", help="train only the donor")
    p.add_argument("--expert", action="append", metavar="TASK=SELECTOR",
                   help="an expert (repeatable; default: " + "; ".join(DEFAULT_EXPERTS) + ")")
    for field in dataclasses.fields(Settings):
        if field.name == "experts":
            continue
        flag = "--" + field.name.replace("_", "-")
        p.add_argument(flag, type=type(getattr(defaults, field.name)),
                       default=getattr(defaults, field.name), help="default: %(default)s")
    args = p.parse_args(argv)
    experts = () if args.no_experts else tuple(args.expert or DEFAULT_EXPERTS)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if f.name != "experts"}
    if values["task"] not in TASKS:
        p.error(f"--task must be one of {', '.join(TASKS)}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists (pass --overwrite to replace it)")
    settings = Settings(**values, experts=experts)
    config = model_config(Language.generate(0, settings.n_words), settings.layers, settings.d_model,
                          settings.heads, settings.d_ff)
    for task, plant in [(settings.task, settings.plant)] + [parse_expert(e) for e in experts]:
        try:  # refuse a bad planted set before any training
            plant_patch(config, plant)
        except JaxpatchError as e:
            print(f"planted: error: {task}: {e}", file=sys.stderr)
            return 2
    try:
        built = build(settings)
    except JaxpatchError as e:
        print(f"planted: error: {e}; nothing was written", file=sys.stderr)
        return 2
    write(built, out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
