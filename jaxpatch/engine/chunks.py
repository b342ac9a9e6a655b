"""The one chunk runner: every batched method (weight sweeps, activation patching) scores its
candidates here.

A method describes its work as `ChunkProgram`s: a compiled program's function and cache key,
the candidates it scores in groups (each group has its own operands, made when the group first
runs), and how a chunk of candidates becomes the program's coefficient rows. `run_chunks` then

- pads each chunk to the program's size, so each program compiles once per size;
- on a mesh, splits each chunk's candidates across the `candidates` devices (chunk sizes are
  rounded up to a multiple of them);
- with a log (`Execution.log`), replays recorded chunks where a group's next candidates begin
  one and records every new chunk, so a resumed run's scores are bitwise an uninterrupted
  run's;
- when a chunk runs out of device memory, retries it at half the size and keeps that size
  for the rest of the task (recorded, so a resumed run chunks alike);
- shows one progress bar.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpatch.engine.plan import is_out_of_memory
from jaxpatch.engine.programs import compiled
from jaxpatch.errors import JaxpatchError
from jaxpatch.mesh import candidate_devices, candidate_specs, shard_candidates, to_host
from jaxpatch.runs.log import TaskLog
from jaxpatch.runs.settings import Execution

__all__ = ["ChunkProgram", "compile_programs", "run_chunks", "round_to_devices"]

_LOG = logging.getLogger("jaxpatch")

Rows = Callable[[Sequence[Any], int], dict[str, np.ndarray]]
"""`rows(chunk, size) -> {leaf: [size, ...]}`: a chunk's coefficients, padded with zero rows."""


@dataclasses.dataclass(frozen=True)
class ChunkProgram:
    """One compiled program's share of a run.

    Attributes:
        key: the static settings the program was built from (its cache key).
        fn: `fn(coefficients, operands) -> scores [size]` (or `[size, width]`).
        size: candidates per call (each chunk is padded to it).
        groups: the candidates (objects with a `name`), one group per set of operands.
        operands: `operands(i)`: group i's operands (made when a chunk of it first runs).
        rows: a chunk's coefficient rows at a size (`Rows`).
        specs: the coefficients' shapes at a size (to compile before running).
    """

    key: tuple
    fn: Callable[..., Any]
    size: int
    groups: Sequence[Sequence[Any]]
    operands: Callable[[int], Any]
    rows: Rows
    specs: Callable[[int], dict[str, jax.ShapeDtypeStruct]]


def round_to_devices(size: int, mesh: Mesh | None) -> int:
    """`size` rounded up to a multiple of the mesh's candidate devices.

    Example:
        >>> round_to_devices(5, None)
        5
    """
    split = candidate_devices(mesh)
    return -(-size // split) * split


def compile_programs(programs: Sequence[ChunkProgram], mesh: Mesh | None) -> float:
    """Compiles every program for its size before any runs (seconds spent).

    Example:
        >>> compile_programs([], None)
        0.0
    """
    if not programs:
        return 0.0
    start = time.perf_counter()
    for p in programs:
        specs = p.specs(p.size)
        compiled(p.key, p.fn, specs if mesh is None else candidate_specs(mesh, specs), p.operands(0))
    return time.perf_counter() - start


def run_chunks(programs: Sequence[ChunkProgram], *, label: str, execution: Execution,
               mesh: Mesh | None) -> dict[str, np.ndarray]:
    """Runs every program's candidates in padded chunks; their raw scores by name.

    Arguments:
        programs: the work.
        label: the progress bar's label ("sweep denoise").
        execution: progress bars and the log (`Execution`).
        mesh: split each chunk's candidates across its `candidates` devices.

    Returns:
        Each candidate's raw score (`[]` or `[width]`, float64) by name.

    Raises:
        JaxpatchError: out of device memory with one candidate per chunk, or a halved chunk
            that no longer splits across the mesh's devices.

    Example:
        >>> from types import SimpleNamespace as Named
        >>> double = ChunkProgram(("double",), lambda a, ops: 2 * a["x"] + ops, 2,
        ...     [[Named(name="a"), Named(name="b"), Named(name="c")]], lambda i: jnp.float32(1),
        ...     lambda chunk, size: {"x": np.arange(size, dtype=np.float32)},
        ...     lambda size: {"x": jax.ShapeDtypeStruct((size,), jnp.float32)})
        >>> {k: float(v) for k, v in run_chunks([double], label="x", execution=Execution(
        ...     progress=False), mesh=None).items()}
        {'a': 1.0, 'b': 3.0, 'c': 1.0}
    """
    from tqdm.auto import tqdm

    log = execution.log
    total = sum(len(g) for p in programs for g in p.groups)
    resumed = 0 if log is None else min(log.recorded_candidates(), total)
    scores: dict[str, np.ndarray] = {}
    limit: int | None = None
    with tqdm(total=total, initial=resumed, unit="cand",
              desc=label + (f" (resumed {resumed})" if resumed else ""),
              disable=None if execution.progress is None else not execution.progress,
              dynamic_ncols=True) as bar:
        for program in programs:
            size = program.size
            for i, group in enumerate(program.groups):
                names = [c.name for c in group]
                ops = None  # made when a chunk of the group must run (not when all replay)
                offset = 0
                while offset < len(group):
                    values = None if log is None else log.replay(names, offset)
                    if values is None:
                        if limit is not None and size > limit:
                            size = _fitting(limit, mesh)
                        chunk = group[offset: offset + size]
                        ops = program.operands(i) if ops is None else ops
                        try:
                            values = _run_chunk(program, size, chunk, ops, mesh)
                        except Exception as error:  # only running out of memory is retried
                            if not is_out_of_memory(error):
                                raise
                            limit = _halved(size, log)
                            continue
                        if log is not None:
                            log.record_chunk(names[offset: offset + len(chunk)], values)
                        bar.update(len(chunk))
                    scores.update(zip(names[offset: offset + len(values)],
                                      np.asarray(values, np.float64)))
                    offset += len(values)
    return scores


def _run_chunk(program: ChunkProgram, size: int, chunk: Sequence[Any], ops: Any,
               mesh: Mesh | None) -> np.ndarray:
    """One chunk's raw scores, padding dropped."""
    rows = program.rows(chunk, size)
    coefficients = ({n: jnp.asarray(a) for n, a in rows.items()} if mesh is None
                    else shard_candidates(mesh, rows))
    return to_host(compiled(program.key, program.fn, coefficients, ops)(coefficients, ops))[: len(chunk)]


def _fitting(limit: int, mesh: Mesh | None) -> int:
    """The halved chunk size, refused when it no longer splits across the mesh."""
    if mesh is not None and limit % candidate_devices(mesh):
        raise JaxpatchError(f"out of device memory at {limit * 2} candidates per chunk, and {limit} "
                            f"do not split across {candidate_devices(mesh)} devices: pass a smaller "
                            "--chunk-size that does")
    return limit


def _halved(chunk: int, log: TaskLog | None) -> int:
    """The chunk size after running out of memory at `chunk` (said once per halving)."""
    if chunk <= 1:
        raise JaxpatchError("out of device memory with one candidate per chunk: use fewer or "
                            "shorter prompts, a lower --dtype, or a device with more memory")
    smaller = chunk // 2
    _LOG.warning("jaxpatch: out of device memory at %d candidates per chunk; continuing with %d",
                 chunk, smaller)
    if log is not None:
        log.record_limit(smaller)
    return smaller

