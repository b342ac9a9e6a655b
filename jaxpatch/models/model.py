"""`Model`: a config, a params pytree and an optional tokenizer, callable on tokens."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.errors import InvalidInputError
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.rounding import jit

__all__ = ["Model", "pad_right", "check_tokens"]


@functools.partial(jit, static_argnums=0)
def _logits(config: ModelConfig, params: Params, tokens: jax.Array,
            attention_mask: jax.Array) -> jax.Array:
    return forward(config, params, tokens, attention_mask).read(None)


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model.

    Attributes:
        config: the architecture (a frozen `ModelConfig`).
        params: the params pytree of jax arrays (see `jaxpatch.param_shapes`).
        tokenizer: a `tokenizers.Tokenizer`, or None when the checkpoint has no tokenizer.json.
        source: the folder it was loaded from (None when built in memory).
        chat_template: its `jaxpatch.chat.ChatTemplate`, or None when its checkpoint has none.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("llama")
        >>> model = Model(cfg, init_params(cfg, jax.random.key(0)))
        >>> model([[1, 2, 3]]).shape
        (1, 3, 128)
    """

    config: ModelConfig
    params: Params
    tokenizer: Any = None
    source: str | None = None
    chat_template: Any = None

    def __call__(self, tokens: Any, attention_mask: Any = None) -> jax.Array:
        """Float32 logits `[batch, seq, vocab]` for int token ids `[batch, seq]`.

        Arguments:
            tokens: token ids, `[batch, seq]` (a list of equal-length lists works too).
            attention_mask: optional `[batch, seq]`, 1 for real tokens, 0 for right padding.

        Returns:
            The logits.

        Raises:
            InvalidInputError: ids out of range, a sequence longer than the context, bad shapes.
        """
        tokens = check_tokens(self.config, tokens)
        if attention_mask is None:
            attention_mask = np.ones(tokens.shape, bool)
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != tokens.shape:
            raise InvalidInputError(f"attention_mask has shape {attention_mask.shape} "
                                    f"but tokens have shape {tokens.shape}")
        return _logits(self.config, self.params, jnp.asarray(tokens), jnp.asarray(attention_mask))

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes texts into a right-padded batch.

        Arguments:
            texts: the strings.

        Returns:
            `(tokens, attention_mask)`, int32 and bool, each `[len(texts), longest]`.

        Example:
            >>> model = jaxpatch.load(fixtures / "llama-gqa")
            >>> tokens, mask = model.encode(["hello world", "hello"])
            >>> tokens.shape, mask.sum(axis=1).tolist()
            ((2, 8), [8, 4])
        """
        if self.tokenizer is None:
            raise InvalidInputError("this checkpoint has no tokenizer.json; pass token ids instead")
        ids = [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]
        return pad_right(ids)


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token id lists into `(tokens, attention_mask)`.

    Example:
        >>> tokens, mask = pad_right([[5, 6], [7]])
        >>> tokens.tolist(), mask.tolist()
        ([[5, 6], [7, 0]], [[True, True], [True, False]])
    """
    longest = max((len(s) for s in sequences), default=0)
    tokens = np.full((len(sequences), longest), pad_id, np.int32)
    mask = np.zeros((len(sequences), longest), bool)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = seq
        mask[row, : len(seq)] = True
    return tokens, mask


def check_tokens(config: ModelConfig, tokens: Any) -> np.ndarray:
    """Validates token ids against a config and returns them as an int32 numpy array.

    Arguments:
        config: the architecture.
        tokens: `[batch, seq]` integer ids.

    Returns:
        The ids as int32 `[batch, seq]`.

    Raises:
        InvalidInputError: not 2-D integers, an id outside `[0, vocab_size)`, or a sequence
            longer than `max_position_embeddings`.

    Example:
        >>> from jaxpatch.models.config import ModelConfig
        >>> check_tokens(ModelConfig.tiny("llama"), [[1, 2]]).dtype
        dtype('int32')
    """
    array = np.asarray(tokens)
    if array.ndim != 2:
        raise InvalidInputError(f"tokens must be [batch, seq], got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"tokens must be integers, got dtype {array.dtype}")
    if array.shape[1] > config.max_position_embeddings:
        raise InvalidInputError(
            f"sequence of {array.shape[1]} tokens is longer than the model's context of "
            f"{config.max_position_embeddings}")
    bad = (array < 0) | (array >= config.vocab_size)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise InvalidInputError(
            f"token id {int(array[row, col])} at [{row}, {col}] is out of range for the "
            f"vocabulary of {config.vocab_size}")
    return array.astype(np.int32)
