"""Planning a sweep: which candidates share a compiled program, in chunks of what size.

A candidate is a component or a custom patch, reduced to the coefficient leaves it sets and the
first block it touches. Candidates confined to one block up to the anchor are *block-local*:
one program serves all of them, whatever their block (the block index is traced). Every other
candidate (several blocks, embeddings, final modules) runs the plain forward from its first
block, one program per first block. Chunks are padded to one size per program so each compiles
once; the size comes from free memory unless given.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import flatten_params
from jaxpatch.components import Component
from jaxpatch.errors import PatchError
from jaxpatch.models.config import ModelConfig
from jaxpatch.patch import Patch, alpha_shapes, component_entries
from jaxpatch.prompts import Batch

__all__ = ["Candidate", "ProgramPlan", "candidates_of", "leaf_layer", "is_block_local", "plan_programs",
           "alpha_rows", "available_memory_bytes", "auto_chunk_size", "is_out_of_memory"]

_MATERIALIZE_BYTES = 256 * 1024**2  # at most this much of per-candidate patched weights
_MAX_AUTO_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One thing to score: a component, or a named custom patch.

    Attributes:
        name: the result's name for it.
        first_layer: the first block it patches (-1: embeddings; n_layers: final modules).
        leaves: the dotted coefficient leaves it sets, in params order.
        component: the component, for component candidates.
        patch: the patch, for custom patches.
    """

    name: str
    first_layer: int
    leaves: tuple[str, ...]
    component: Component | None = None
    patch: Patch | None = None


def leaf_layer(config: ModelConfig, name: str) -> int:
    """The block a params leaf belongs to (-1: the embeddings; n_layers: the final modules).

    Example:
        >>> leaf_layer(cfg, "layers.1.mlp.up_proj.weight"), leaf_layer(cfg, "norm.weight")
        (1, 2)
    """
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return -1 if name.startswith("embed") else config.n_layers


def candidates_of(config: ModelConfig,
                  items: Sequence[Component] | Mapping[str, Patch]) -> list[Candidate]:
    """Candidates from components or from named custom patches, in the given order.

    Raises:
        PatchError: a custom patch sets no coefficient.

    Example:
        >>> from jaxpatch.components import select
        >>> c = candidates_of(cfg, select(cfg, "layers.1.mlp.down_proj", "module"))[0]
        >>> c.first_layer, c.leaves
        (1, ('layers.1.mlp.down_proj.weight',))
    """
    if isinstance(items, Mapping):
        out = []
        for name, patch in items.items():
            flat = flatten_params(patch.alpha)
            leaves = tuple(n for n, a in flat.items() if np.any(np.asarray(a) != 0))
            if not leaves:
                raise PatchError(f"candidate patch {name!r} patches nothing (all coefficients 0)")
            out.append(Candidate(name, min(leaf_layer(config, n) for n in leaves), leaves,
                                 patch=patch))
        return out
    return [Candidate(c.name, c.layer, tuple(component_entries(config, c)), component=c)
            for c in items]


def is_block_local(candidate: Candidate, last_block: int) -> bool:
    """Whether a candidate patches one block only, at or before `last_block`."""
    prefix = f"layers.{candidate.first_layer}."
    return 0 <= candidate.first_layer <= last_block and all(n.startswith(prefix)
                                                            for n in candidate.leaves)


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """The candidates one compiled program scores, and how.

    Attributes:
        kind: "local" (one patched block, traced index, then the shared blocks) or "general"
            (the plain forward from `start_layer` with the signature's leaves mixed).
        start_layer: for "general", the block whose input the runs start from (0 when the
            embeddings are patched); for "local", -1 (every group has its own block).
        signature: the coefficient leaves the program takes, relative to a block for "local"
            (`mlp.down_proj.weight`), whole dotted names for "general".
        chunk: candidates per call (chunks are padded to it).
        dense: build each candidate's patched weights (True) or keep them factored.
        groups: the candidates, one group per block the runs start from.
    """

    kind: Literal["local", "general"]
    start_layer: int
    signature: tuple[str, ...]
    chunk: int
    dense: bool
    groups: tuple[tuple[Candidate, ...], ...]

    def strip(self, candidate: Candidate) -> str:
        """The prefix removed from a candidate's leaf names to name its signature leaves."""
        return f"layers.{candidate.first_layer}." if self.kind == "local" else ""

    def alpha_specs(self, config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes of one chunk's stacked coefficients, by signature leaf (built once per
        program shape: every chunk asks)."""
        return _alpha_specs(config, self.kind, self.signature, self.chunk)


@functools.lru_cache(maxsize=256)
def _alpha_specs(config: ModelConfig, kind: str, signature: tuple[str, ...],
                 chunk: int) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = alpha_shapes(config)
    prefix = "layers.0." if kind == "local" else ""
    return {n: jax.ShapeDtypeStruct((chunk, *shapes[prefix + n]), jnp.float32) for n in signature}


def plan_programs(config: ModelConfig, candidates: Sequence[Candidate], last_block: int, *,
                  leaf_bytes: Mapping[str, int], chunk_size: int | None, auto_chunk: int,
                  materialize: bool | None, budget: int) -> list[ProgramPlan]:
    """Groups candidates into programs: one block-local program, then one general program
    per first block.

    Arguments:
        config: the architecture.
        candidates: the candidates to run (none after the anchor).
        last_block: the last block that runs (the anchor block, or the last block).
        leaf_bytes: every params leaf's size in bytes, by dotted name, in params order.
        chunk_size: candidates per call (None: `auto_chunk`), capped by the largest group.
        auto_chunk: the chunk size memory allows.
        materialize: build patched weights per candidate (True), keep them factored (False),
            or decide by memory (None).
        budget: bytes a chunk may use.

    Returns:
        The plans, local first, then general ones by first block.

    Example:
        >>> from jaxpatch.components import select
        >>> cands = candidates_of(cfg, select(cfg, None, "module"))
        >>> sizes = {n: a.nbytes for n, a in jaxpatch.flatten_params(base.params).items()}
        >>> plans = plan_programs(cfg, cands, 1, leaf_bytes=sizes, chunk_size=4, auto_chunk=64,
        ...                       materialize=None, budget=2**30)
        >>> [(p.kind, p.start_layer, len(p.groups)) for p in plans]
        [('local', -1, 2), ('general', 0, 1), ('general', 2, 1)]
    """
    plans = []
    local = [c for c in candidates if is_block_local(c, last_block)]
    if local:
        by_layer: dict[int, list[Candidate]] = {}
        for c in local:
            by_layer.setdefault(c.first_layer, []).append(c)
        used = {n.split(".", 2)[2] for c in local for n in c.leaves}
        signature = tuple(n[len("layers.0."):] for n in leaf_bytes
                          if n.startswith("layers.0.") and n[len("layers.0."):] in used)
        size = _chunk(chunk_size, auto_chunk, max(len(g) for g in by_layer.values()))
        dense = _use_dense(materialize, size, sum(leaf_bytes[f"layers.0.{n}"] for n in signature),
                           budget)
        plans.append(ProgramPlan("local", -1, signature, size, dense,
                                 tuple(tuple(g) for _, g in sorted(by_layer.items()))))
    general: dict[int, list[Candidate]] = {}
    for c in candidates:
        if not is_block_local(c, last_block):
            general.setdefault(c.first_layer, []).append(c)
    for first_layer, group in sorted(general.items()):
        used = {n for c in group for n in c.leaves}
        signature = tuple(n for n in leaf_bytes if n in used)
        size = _chunk(chunk_size, auto_chunk, len(group))
        dense = _use_dense(materialize, size, sum(leaf_bytes[n] for n in signature), budget)
        plans.append(ProgramPlan("general", max(first_layer, 0), signature, size, dense,
                                 (tuple(group),)))
    return plans


def _chunk(requested: int | None, auto: int, largest_group: int) -> int:
    return max(1, min(requested or auto, largest_group))


def _use_dense(materialize: bool | None, size: int, signature_bytes: int, budget: int) -> bool:
    if materialize is not None:
        return materialize
    return size * signature_bytes <= min(_MATERIALIZE_BYTES, budget // 4)


def alpha_rows(config: ModelConfig, plan: ProgramPlan,
               chunk: Sequence[Candidate]) -> dict[str, np.ndarray]:
    """The coefficients of a chunk of candidates, stacked as `plan.alpha_specs` shapes them
    (zero rows pad the chunk).

    Example:
        >>> from jaxpatch.components import select
        >>> cands = candidates_of(cfg, select(cfg, "layers.1.mlp[neuron=1-3]", "neuron"))
        >>> sizes = {n: a.nbytes for n, a in jaxpatch.flatten_params(base.params).items()}
        >>> plan = plan_programs(cfg, cands, 1, leaf_bytes=sizes, chunk_size=2, auto_chunk=4,
        ...                      materialize=None, budget=2**30)[0]
        >>> alpha_rows(cfg, plan, cands[2:])["mlp.down_proj.weight"][:, :4, 0].tolist()  # padded
        [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    rows = {name: np.zeros(spec.shape, np.float32) for name, spec in plan.alpha_specs(config).items()}
    for i, cand in enumerate(chunk):
        strip = len(plan.strip(cand))
        if cand.component is not None:
            for name, index in component_entries(config, cand.component).items():
                rows[name[strip:]][(i, *index)] = 1.0
        elif cand.patch is not None:
            flat = flatten_params(cand.patch.alpha)
            for name in cand.leaves:
                rows[name[strip:]][i] = np.asarray(flat[name])
    return rows


def available_memory_bytes() -> int:
    """Free memory on the default device (host memory on CPU).

    Example:
        >>> available_memory_bytes() > 0
        True
    """
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # pragma: no cover
        return 4 * 1024**3


def auto_chunk_size(config: ModelConfig, batch: Batch, budget: int, model_split: int = 1,
                    prompt_split: int = 1) -> int:
    """How many candidates' activations fit in `budget` bytes of one device: a power of two,
    at most 256, so that the programs' shapes (and the compilation cache's keys) do not move
    with small changes of free memory.

    Arguments:
        config, batch: the model and the prompts.
        budget: bytes for one chunk's activations on one device.
        model_split: devices the heads and MLP neurons are split over (a mesh's `model` axis).
        prompt_split: devices the prompts are split over (a mesh's `data` axis).

    Returns:
        Candidates per device.

    Example:
        >>> auto_chunk_size(cfg, batch, 2**30)
        256
        >>> auto_chunk_size(cfg, batch, 150_000)  # room for 3 candidates: rounded down
        2
    """
    p, s = batch.tokens.shape
    item = jnp.dtype(config.dtype).itemsize
    per_token = 4 * config.d_model + (3 * config.d_ff + 2 * config.n_heads * s) / model_split
    per_candidate = int(-(-p // prompt_split) * s * per_token * max(item, 4) * 2)
    fits = max(1, min(_MAX_AUTO_CHUNK, budget // max(per_candidate, 1)))
    return 1 << (fits.bit_length() - 1)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error raised by running a program is the device running out of memory
    (XLA's RESOURCE_EXHAUSTED, or a host `MemoryError`).

    Example:
        >>> is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"))
        True
        >>> is_out_of_memory(ValueError("shapes do not match"))
        False
    """
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and "RESOURCE_EXHAUSTED" in str(error)
