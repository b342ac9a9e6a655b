"""Greedy generation with a key/value cache, and many patched models generating at once.

`greedy_generate` is pure JAX: a prefill runs the prompts through every block once, keeping
each block's keys and values for the whole buffer (prompt and continuation), then a
`lax.scan` of decoding steps runs one position per step through the blocks, reading and
extending the cache. It computes what a full forward of the growing sequence computes at each
step, and picks the same tokens (tested against `prompts.greedy_continuations`, which reruns
the whole sequence every step).

`generate_under_patches` generates with many patched models: each candidate's coefficients mix
the start and target params (`jaxpatch.apply`), vmapped over a chunk of candidates, so one
compiled program serves every chunk; the result is what patching each candidate alone and
then generating gives.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.engine.prepared import PreparedPair
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import (
    KVCache,
    attention_allowed,
    block_cached,
    embed,
    rope_at,
    rope_tables,
    unembed,
)
from jaxpatch.modes import Direction
from jaxpatch.pair import endpoints
from jaxpatch.patch import Patch, apply
from jaxpatch.prompts import Prompt, prompt_buffer
from jaxpatch.rounding import jit
from jaxpatch.runs.settings import Execution, execution_of

__all__ = ["greedy_generate", "generate_under_patches"]


@functools.partial(jit, static_argnums=(0, 4))
def greedy_generate(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
                    n_tokens: int) -> jax.Array:
    """Greedy continuations of right-padded prompts, with a key/value cache.

    Arguments:
        config: the architecture (static).
        params: the model.
        tokens: int `[batch, width]`: the prompts, right-padded, with room for `n_tokens`
            (`prompt_buffer`).
        lengths: int `[batch]`: each prompt's length.
        n_tokens: how many tokens to generate (static).

    Returns:
        int `[batch, n_tokens]`: the generated tokens.

    Example:
        >>> from jaxpatch.prompts import greedy_continuations
        >>> prompts = [Prompt((1, 2, 3)), Prompt((4, 5))]
        >>> tokens, lengths = prompt_buffer(cfg, prompts, 4)
        >>> out = greedy_generate(cfg, base.params, tokens, lengths, 4)
        >>> out.tolist() == greedy_continuations(cfg, base.params, prompts, 4)
        True
    """
    batch, width = tokens.shape
    x = embed(config, params, tokens)
    rope = rope_tables(config, width, x.dtype)
    prompt_mask = jnp.arange(width)[None, :] < lengths[:, None]
    everywhere = jnp.arange(width)[None, :].repeat(batch, 0)
    caches = []
    for i in range(config.n_layers):  # prefill: every position, keys and values kept
        empty = jnp.zeros((batch, width, config.n_kv_heads, config.head_dim), x.dtype)
        allowed = attention_allowed(prompt_mask, config.sliding_windows[i])
        x, cache = block_cached(config, params["layers"][i], x, KVCache(empty, empty),
                                everywhere, allowed, rope_at(config, rope, i))
        caches.append(cache)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    first = jnp.argmax(unembed(config, params, last)[:, 0], axis=-1).astype(jnp.int32)
    full = jnp.ones((batch, width), jnp.bool_)  # causality and windows decide what is seen

    def step(carry: tuple[jax.Array, list[KVCache]], i: jax.Array):
        token, caches = carry
        position = (lengths + i)[:, None]
        h = embed(config, params, token[:, None], positions=position)
        updated = []
        for layer in range(config.n_layers):
            allowed = attention_allowed(full, config.sliding_windows[layer])
            row = jnp.take_along_axis(allowed, position[:, None, :, None], axis=2)
            h, cache = block_cached(config, params["layers"][layer], h, caches[layer], position,
                                    row, rope_at(config, rope, layer))
            updated.append(cache)
        following = jnp.argmax(unembed(config, params, h)[:, 0], axis=-1).astype(jnp.int32)
        return (following, updated), token

    _, generated = jax.lax.scan(step, (first, caches), jnp.arange(n_tokens))
    return generated.T


def generate_under_patches(pair: PreparedPair, patches: Mapping[str, Patch],
                           prompts: Sequence[Prompt], n_tokens: int, *,
                           direction: Direction = "denoise",
                           execution: Execution | None = None) -> dict[str, np.ndarray]:
    """Greedy continuations of every patched model: the start model with each patch's
    coefficients moving its weights towards the target (`jaxpatch.endpoints`), many at once.

    Arguments:
        pair: the base/donor pair (its prompts are not used: generation reads `prompts`).
        patches: the candidates by name (`Patch.from_components`, `Patch.from_selector`).
        prompts: what to continue.
        n_tokens: tokens per continuation.
        direction: which way the patches move weights (as for `sweep`).
        execution: `chunk_size` patched models per compiled call (default 8; chunks are padded).

    Returns:
        name -> int `[prompts, n_tokens]`.

    Example:
        >>> patches = {"mlp 1": jaxpatch.Patch.from_selector(cfg, "layers.1.mlp")}
        >>> out = generate_under_patches(pair, patches, [Prompt((1, 2, 3))], 3)
        >>> out["mlp 1"].shape
        (1, 3)
    """
    start, target = endpoints(pair.base, pair.donor, direction)
    tokens, lengths = prompt_buffer(pair.config, prompts, n_tokens)
    names = list(patches)
    size = max(1, min(execution_of(execution).chunk_size or 8, len(names)))
    out: dict[str, np.ndarray] = {}
    for offset in range(0, len(names), size):
        chunk = names[offset: offset + size]
        alphas = [patches[n].alpha for n in chunk]
        alphas += [jax.tree_util.tree_map(jnp.zeros_like, alphas[0])] * (size - len(chunk))
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *alphas)
        generated = np.asarray(_generate_chunk(pair.config, n_tokens, stacked, start, target,
                                               jnp.asarray(tokens), jnp.asarray(lengths)))
        out.update({n: generated[j] for j, n in enumerate(chunk)})
    return out


@functools.partial(jit, static_argnums=(0, 1))
def _generate_chunk(config: ModelConfig, n_tokens: int, alphas: Params, start: Params,
                    target: Params, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Every candidate of a chunk generates (vmapped over its coefficients)."""
    def one(alpha: Params) -> jax.Array:
        return greedy_generate(config, apply(Patch(alpha), start, target), tokens, lengths,
                               n_tokens)

    return jax.vmap(one)(alphas)
