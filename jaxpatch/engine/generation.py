"""Greedy generation with a key/value cache, and many patched models generating at once.

`greedy_generate` is pure JAX: a prefill runs the prompts through every block once, keeping
each block's keys and values for the whole buffer (prompt and continuation), then a
`lax.scan` of decoding steps runs one position per step through the blocks, reading and
extending the cache. It computes what a full forward of the growing sequence computes at each
step, and picks the same tokens (tested against `prompts.greedy_continuations`, which reruns
the whole sequence every step).

`generate_under_patches` generates with many patched models: each candidate's coefficients mix
the start and target weights it patches (kept factored, `MixedWeight`), vmapped over a chunk of
candidates, so one compiled program serves every chunk and the weights no candidate patches are
shared; the result is what patching each candidate alone and then generating gives. A pair
prepared with position-restricted patches (`prepare(..., patch_at=...)`) applies them at those
positions of the prompts and of the generated tokens. Chunks run
through the chunk runner (`run_chunks`): sized from memory, halved when out of it, recorded in
a run's log and replayed when it resumes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import flatten_params, replace_leaves
from jaxpatch.engine.chunks import ChunkProgram, run_chunks
from jaxpatch.engine.plan import available_memory_bytes, leaf_layer
from jaxpatch.engine.prepared import PreparedPair
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import (
    KVCache,
    MixedWeight,
    at_positions,
    attention_allowed,
    block_cached,
    embed,
    rope_at,
    rope_tables,
    unembed,
)
from jaxpatch.modes import Direction
from jaxpatch.pair import endpoints
from jaxpatch.patch import Patch, alpha_shapes
from jaxpatch.prompts import Prompt, patch_where, prompt_buffer, token_roles
from jaxpatch.rounding import jit
from jaxpatch.runs.settings import Execution, execution_of

__all__ = ["greedy_generate", "greedy_replies", "generate_under_patches"]


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
    last_position = (lengths - 1)[:, None]
    last = jnp.take_along_axis(x, last_position[..., None], axis=1)
    first = jnp.argmax(unembed(config, at_positions(params, last_position), last)[:, 0],
                       axis=-1).astype(jnp.int32)
    full = jnp.ones((batch, width), jnp.bool_)  # causality and windows decide what is seen

    def step(carry: tuple[jax.Array, list[KVCache]], i: jax.Array):
        token, caches = carry
        position = (lengths + i)[:, None]
        here = at_positions(params, position)  # position-restricted weights at this step
        h = embed(config, here, token[:, None], positions=position)
        updated = []
        for layer in range(config.n_layers):
            allowed = attention_allowed(full, config.sliding_windows[layer])
            row = jnp.take_along_axis(allowed, position[:, None, :, None], axis=2)
            h, cache = block_cached(config, here["layers"][layer], h, caches[layer], position,
                                    row, rope_at(config, rope, layer))
            updated.append(cache)
        following = jnp.argmax(unembed(config, here, h)[:, 0], axis=-1).astype(jnp.int32)
        return (following, updated), token

    _, generated = jax.lax.scan(step, (first, caches), jnp.arange(n_tokens))
    return generated.T


def greedy_replies(config: ModelConfig, params: Params, prompts: Sequence[Prompt], n_tokens: int,
                   batch: int = 32) -> list[list[int]]:
    """Greedy continuations of many prompts by one model (`greedy_generate`), in batches of
    `batch` padded to one width: one compiled program for the whole set.

    Arguments:
        config, params: the model.
        prompts: the prompts.
        n_tokens: tokens generated per prompt.
        batch: at most this many prompts per pass (the last pass padded with repeats of its
            last prompt, so every pass runs one program).

    Returns:
        Per prompt, its `n_tokens` generated token ids.

    Example:
        >>> out = greedy_replies(cfg, base.params, [Prompt((1, 2, 3)), Prompt((4,))], 3)
        >>> [len(o) for o in out]
        [3, 3]
    """
    tokens, lengths = prompt_buffer(config, prompts, n_tokens)
    batch = min(batch, len(prompts))  # a small set is not padded up to `batch`
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        rows = min(batch, len(prompts) - start)
        take = np.minimum(np.arange(start, start + batch), start + rows - 1)
        new = greedy_generate(config, params, jnp.asarray(tokens[take]),
                              jnp.asarray(lengths[take]), n_tokens)
        out += np.asarray(new)[:rows].tolist()
    return out


def generate_under_patches(pair: PreparedPair, patches: Mapping[str, Patch],
                           prompts: Sequence[Prompt], n_tokens: int, *,
                           direction: Direction = "denoise",
                           execution: Execution | None = None) -> dict[str, np.ndarray]:
    """Greedy continuations of every patched model: the start model with each patch's
    coefficients moving its weights towards the target (`jaxpatch.endpoints`), many at once.

    The patched weights stay factored (`MixedWeight`): the weights no candidate patches are
    shared by every candidate of a chunk, so their matmuls run once over all candidates' rows,
    and the prefill of the blocks before the first patched one runs once per chunk. Chunks go
    through the chunk runner: padded, halved when out of memory, and with `execution.log`
    recorded and replayed, so an interrupted run resumes with the same tokens.

    Arguments:
        pair: the base/donor pair (its prompts are not used: generation reads `prompts`; its
            `patch_at` says at which positions of the prompts and continuations the patches
            apply).
        patches: the candidates by name (`Patch.from_components`, `Patch.from_selector`).
        prompts: what to continue.
        n_tokens: tokens per continuation.
        direction: which way the patches move weights (as for `sweep`).
        execution: `chunk_size` patched models per compiled call (default: as many as fit in
            `memory_fraction` of free memory, at most 64), progress and the log.

    Returns:
        name -> int `[prompts, n_tokens]`.

    Example:
        >>> patches = {"mlp 1": jaxpatch.Patch.from_selector(cfg, "layers.1.mlp")}
        >>> out = generate_under_patches(pair, patches, [Prompt((1, 2, 3))], 3)
        >>> out["mlp 1"].shape
        (1, 3)
    """
    settings = execution_of(execution)
    config = pair.config
    start, target = endpoints(pair.base, pair.donor, direction)
    tokens, lengths = prompt_buffer(config, prompts, n_tokens)
    where = patch_where(token_roles(prompts, tokens.shape[1]), pair.patch_at)
    order = list(flatten_params(start))
    candidates = [_candidate(config, name, patch, order) for name, patch in patches.items()]
    moving = [c for c in candidates if c.alpha]
    out: dict[str, np.ndarray] = {}
    if len(moving) < len(candidates):  # a patch that moves no weight: the start model itself
        same = np.asarray(greedy_generate(config, start, jnp.asarray(tokens),
                                          jnp.asarray(lengths), n_tokens))
        out.update({c.name: same for c in candidates if not c.alpha})
    size = settings.chunk_size or _auto_chunk(config, tokens.shape,
                                              int(available_memory_bytes() * settings.memory_fraction))
    targets = flatten_params(target)
    buffer = (jnp.asarray(tokens), jnp.asarray(lengths))
    programs = []
    for group in _groups(moving):
        signature = tuple(leaf for leaf in order if any(leaf in c.alpha for c in group))
        operands = _Operands(start, {leaf: targets[leaf] for leaf in signature}, *buffer, where)
        programs.append(_program(config, n_tokens, signature, min(size, len(group)), group,
                                 operands))
    raw = run_chunks(programs, label=f"generate {direction}", execution=settings, mesh=None)
    out.update({c.name: raw[c.name].astype(np.int32) for c in moving})
    return {c.name: out[c.name] for c in candidates}


_MAX_PROGRAMS = 4
"""Candidates are grouped by their first patched block into at most this many programs (each
compiles once): more groups share more of the prefill, but each costs a compilation."""


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A patched model to generate with: its name, first patched block (-1: the embeddings),
    and its coefficients on the leaves it patches."""

    name: str
    first_layer: int
    alpha: dict[str, np.ndarray]


def _candidate(config: ModelConfig, name: str, patch: Patch, order: Sequence[str]) -> _Candidate:
    """A patch's nonzero coefficient leaves, in params order, and its first patched block."""
    flat = flatten_params(patch.alpha)
    alpha = {leaf: np.asarray(flat[leaf]) for leaf in order if np.any(np.asarray(flat[leaf]) != 0)}
    return _Candidate(name, min((leaf_layer(config, leaf) for leaf in alpha),
                                default=config.n_layers), alpha)


def _groups(candidates: Sequence[_Candidate]) -> list[list[_Candidate]]:
    """Candidates grouped by first patched block, runs of neighbouring blocks merged so that
    there are at most `_MAX_PROGRAMS` groups of similar size; within a group the candidates
    keep their given order. The blocks before a group's first patched block prefill once per
    chunk, and the weights no candidate of the group patches are shared by the whole chunk."""
    by_layer: dict[int, list[_Candidate]] = {}
    for c in candidates:
        by_layer.setdefault(c.first_layer, []).append(c)
    layers = sorted(by_layer)
    per_group = -(-len(candidates) // _MAX_PROGRAMS)
    groups: list[list[_Candidate]] = []
    for layer in layers:
        if groups and (len(groups) >= _MAX_PROGRAMS or len(groups[-1]) < per_group):
            groups[-1].extend(by_layer[layer])
        else:
            groups.append(list(by_layer[layer]))
    return groups


class _Operands(NamedTuple):
    """What every chunk generates from: the start model, the target's signature leaves, the
    prompt buffer, the prompts' lengths and where the patches apply (None: everywhere)."""

    start: Params
    targets: dict[str, jax.Array]
    tokens: jax.Array
    lengths: jax.Array
    where: jax.Array | None


def _auto_chunk(config: ModelConfig, shape: tuple[int, int], budget: int) -> int:
    """Patched models per chunk whose activations and key/value caches fit in `budget` bytes:
    a power of two, at most 64."""
    prompts, width = shape
    item = max(jnp.dtype(config.dtype).itemsize, 4)
    caches = 2 * config.n_layers * config.n_kv_heads * config.head_dim
    per_token = caches + 2 * (4 * config.d_model + 3 * config.d_ff + 2 * config.n_heads * width)
    fits = max(1, min(64, budget // max(prompts * width * per_token * item, 1)))
    return 1 << (fits.bit_length() - 1)


def _program(config: ModelConfig, n_tokens: int, signature: tuple[str, ...], size: int,
             candidates: Sequence[_Candidate], operands: _Operands) -> ChunkProgram:
    """The chunk runner's program: each chunk's candidates generate, vmapped over their
    coefficients on the signature leaves (every other weight shared)."""
    shapes = {leaf: alpha_shapes(config)[leaf] for leaf in signature}

    def rows(chunk: Sequence[_Candidate], at: int) -> dict[str, np.ndarray]:
        out = {leaf: np.zeros((at, *shapes[leaf]), np.float32) for leaf in signature}
        for i, candidate in enumerate(chunk):
            for leaf, alpha in candidate.alpha.items():
                out[leaf][i] = alpha
        return out

    def specs(at: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {leaf: jax.ShapeDtypeStruct((at, *shapes[leaf]), jnp.float32) for leaf in signature}

    def run(alphas: dict[str, jax.Array], ops: _Operands) -> jax.Array:
        flat = flatten_params(ops.start)

        def one(alpha: dict[str, jax.Array]) -> jax.Array:
            mixed = {n: MixedWeight(flat[n], ops.targets[n], alpha[n], ops.where) for n in alpha}
            return greedy_generate(config, replace_leaves(ops.start, mixed), ops.tokens,
                                   ops.lengths, n_tokens)

        return jax.vmap(one)(alphas)

    key = ("generate", config, n_tokens, signature, operands.where is not None)
    return ChunkProgram(key, run, size, [candidates],
                        lambda _: operands, rows, specs)
