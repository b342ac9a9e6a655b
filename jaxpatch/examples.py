"""Small random base/donor pairs to try things on: what docstring examples and tests run.

`example_pair()` is the pair every docstring example uses as `cfg`, `base`, `donor` and
`batch`: a two-block Llama-style model (`ModelConfig.tiny("llama")`) with random weights, a
donor with independent random weights, and three prompts with targets and foils.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from jaxpatch.models.config import Family, ModelConfig, init_params
from jaxpatch.models.model import Model
from jaxpatch.prompts import Batch, Prompt, make_batch

__all__ = ["ExamplePair", "EXAMPLE_PROMPTS", "random_pair", "example_pair"]

EXAMPLE_PROMPTS: tuple[Prompt, ...] = (
    Prompt((1, 2, 3, 4, 5), target=(9,), foil=(8,)),
    Prompt((7, 8, 9), target=(3,), foil=(4,)),
    Prompt((11, 12, 13, 14), target=(5,), foil=(6,)),
)
"""Three prompts of different lengths (so batches are padded), each with a target and a foil."""


@dataclasses.dataclass(frozen=True)
class ExamplePair:
    """A pair and a batch, ready to score.

    Attributes:
        config: the architecture.
        base, donor: the models.
        batch: `EXAMPLE_PROMPTS`, read at the last position.
    """

    config: ModelConfig
    base: Model
    donor: Model
    batch: Batch


def random_pair(family: Family = "llama", *, seed: int = 0, scale: float = 0.2,
                perturbation: float | None = None, **overrides: Any) -> tuple[Model, Model]:
    """A tiny random base/donor pair of one family.

    Arguments:
        family: the model family (`ModelConfig.tiny(family, **overrides)`).
        seed: the base's seed; an independent donor uses `seed + 1`.
        scale: the weights' standard deviation.
        perturbation: None for a donor with independent random weights, else the standard
            deviation of Gaussian noise added to every base weight (a donor close to the base,
            as after fine-tuning).
        overrides: config fields to change, e.g. `d_ff=16`.

    Returns:
        `(base, donor)`.

    Example:
        >>> base, donor = random_pair("gpt2", perturbation=0.05, d_ff=16)
        >>> base.config == donor.config, base.config.d_ff
        (True, 16)
    """
    config = ModelConfig.tiny(family, **overrides)
    base = init_params(config, jax.random.key(seed), scale=scale)
    if perturbation is None:
        donor = init_params(config, jax.random.key(seed + 1), scale=scale)
    else:
        leaves, treedef = jax.tree_util.tree_flatten(base)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        donor = jax.tree_util.tree_unflatten(treedef, [
            x + perturbation * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return Model(config, base), Model(config, donor)


@functools.lru_cache(maxsize=1)
def example_pair() -> ExamplePair:
    """The pair docstring examples use (built once).

    Example:
        >>> pair = example_pair()
        >>> pair.config.n_layers, pair.batch.tokens.shape
        (2, (3, 5))
    """
    base, donor = random_pair("llama")
    return ExamplePair(base.config, base, donor, make_batch(base.config, EXAMPLE_PROMPTS))
