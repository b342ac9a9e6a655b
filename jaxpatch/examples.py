"""Small random base/donor pairs to try things on: what docstring examples and tests run.

`example_pair()` is the pair every docstring example uses as `cfg`, `base`, `donor` and
`batch`: a two-block Llama-style model (`ModelConfig.tiny("llama")`) with random weights, a
donor with independent random weights, and three prompts with targets and foils.

`chain_pair()` is built by hand instead: a behavior with a known source -> router -> executor
chain, the ground truth `jaxpatch.hierarchy` is tested on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from jaxpatch._tree import flatten_params, unflatten_dotted
from jaxpatch.models.config import Family, ModelConfig, init_params, param_shapes
from jaxpatch.models.model import Model
from jaxpatch.prompts import Batch, Prompt, make_batch

__all__ = ["ExamplePair", "EXAMPLE_PROMPTS", "random_pair", "example_pair", "CHAIN_ANSWER",
           "chain_pair"]

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


CHAIN_ANSWER = 1
"""The token the chain pair's donor answers every prompt with."""


@functools.lru_cache(maxsize=1)
def chain_pair() -> ExamplePair:
    """A three-block model with hand-set weights whose behavior runs through a known chain.

    The residual stream's coordinates carry one feature each. Every token embeds a constant
    (coordinate 0) and its own identity (coordinates 4-7, so positions differ).

        source    block 0's MLP reads the constant and writes feature 1: in the donor only
                  (`layers.0.mlp.down_proj` is the one tensor that differs from the base)
        router    block 1's attention (uniform: zero queries and keys) averages feature 1 over
                  the positions and writes it as feature 2
        executor  block 2's MLP turns feature 2 into feature 3 (silu(f2) * f2)
        readout   lm_head maps feature 3 to the answer token `CHAIN_ANSWER`; the constant
                  gives token 0 a small lead, so the base does not answer

    Router, executor and readout are the same in base and donor: only the source's weights
    carry the behavior; the router only passes it on; the executor is needed for it to reach
    the output. Every other weight is zero (norm weights one).

    Returns:
        An `ExamplePair` whose batch reads the answer after four prompts (`positions="targets"`).

    Example:
        >>> pair = chain_pair()
        >>> from jaxpatch.prompts import greedy_continuations, Prompt
        >>> [greedy_continuations(pair.config, m.params, [Prompt((2, 3, 4))], 1)[0][0]
        ...  for m in (pair.base, pair.donor)]
        [0, 1]
    """
    config = ModelConfig.tiny("llama", vocab_size=8, d_model=8, n_layers=3, n_heads=1,
                              n_kv_heads=1, head_dim=4, d_ff=4, max_position_embeddings=16)
    p = {name: np.zeros(spec.shape, np.float32)
         for name, spec in flatten_params(param_shapes(config)).items()}
    for name in p:
        if name.endswith("layernorm.weight") or name == "norm.weight":
            p[name][:] = 1.0
    p["embed_tokens.weight"][:, 0] = 1.0
    p["embed_tokens.weight"][np.arange(8), 4 + np.arange(8) % 4] = 0.5
    p["layers.0.mlp.gate_proj.weight"][0, 0] = 2.0  # the source: constant -> neuron 0 ...
    p["layers.0.mlp.up_proj.weight"][0, 0] = 1.0
    donor_down = p["layers.0.mlp.down_proj.weight"].copy()
    donor_down[0, 1] = 0.5  # ... -> feature 1, in the donor only
    p["layers.1.self_attn.v_proj.weight"][1, 0, 0] = 1.0  # the router: feature 1 -> head ...
    p["layers.1.self_attn.o_proj.weight"][0, 0, 2] = 1.0  # ... -> feature 2
    p["layers.2.mlp.gate_proj.weight"][2, 0] = 4.0  # the executor: feature 2 -> neuron 0 ...
    p["layers.2.mlp.up_proj.weight"][2, 0] = 4.0
    p["layers.2.mlp.down_proj.weight"][0, 3] = 1.0  # ... -> feature 3
    p["lm_head.weight"][3, CHAIN_ANSWER] = 4.0
    p["lm_head.weight"][0, 0] = 1.0
    base = unflatten_dotted(p)
    donor = unflatten_dotted({**p, "layers.0.mlp.down_proj.weight": donor_down})
    prompts = [Prompt(tuple(int(t) for t in seq), target=(CHAIN_ANSWER,))
               for seq in ((2, 3, 4), (5, 6), (7, 2, 5, 3), (4, 4, 6))]
    return ExamplePair(config, Model(config, base), Model(config, donor),
                       make_batch(config, prompts, "targets"))

