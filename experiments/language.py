"""The synthetic language of planted pairs and the instruction tasks over it.

Words follow a sparse second-order Markov chain: the next word's candidates depend on the previous
word, their probabilities on the class of the word before it, so continuing text needs attention.
An instruction (`<bos> <map> x1..xn <sep>`) is answered by `f(x1)..f(xn) <eos>` (map), by the
words reversed (reverse) or sorted (sort).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.prompts import Prompt

__all__ = ["SPECIALS", "TASKS", "Language", "tokenizer", "text_batches", "task_batches",
           "next_word_accuracy"]

SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<sep>")
TASKS: tuple[str, ...] = ("map", "reverse", "sort")


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

    def shifted(self, seed: int) -> Language:
        """The same words, successors and mapping with new transition probabilities: a shift
        in the language's statistics (what the `text` decoy learns).

        Example:
            >>> a = Language.generate(0)
            >>> b = a.shifted(0)
            >>> bool((a.successors == b.successors).all()), bool((a.weights == b.weights).all())
            (True, False)
        """
        rng = np.random.default_rng([seed, 9])
        weights = rng.dirichlet(np.full(self.successors.shape[1], 0.5), size=self.weights.shape[:2])
        return dataclasses.replace(self, weights=weights)

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
