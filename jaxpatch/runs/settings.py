"""`Execution`: how a method runs, never what it computes.

Every entry point takes the science as its own parameters (pair, metric, granularity,
direction, selector) and how to run it as one `Execution`: chunk sizes, memory, progress bars,
the progress log of a resumable run, and the memory/compute trade-offs of gradients. Any two
settings give the same scores up to float32 rounding (chunk sizes change the order of sums; see
`docs/decisions/0016`), so results record them as provenance, not as part of the science.

Where the work runs (a device mesh) is fixed when a pair is prepared (`jaxpatch.prepare`):
the pair's arrays are placed then, and every call on the pair runs there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxpatch.errors import InvalidInputError
from jaxpatch.runs.log import TaskLog

__all__ = ["Execution", "execution_of"]


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a method runs: chunking, memory, progress and the log of a resumable run.

    Attributes:
        chunk_size: candidates per compiled call (chunks are padded to it); None: sized from
            free device memory (sweeps) or 64 (activation patching).
        memory_fraction: the share of free device memory a chunk may use.
        materialize: sweeps: build each candidate's patched weights (True), keep them factored
            (False), or choose by memory (None).
        prompt_batch: gradients: accumulate over chunks of this many prompts (None: all at once).
        step_batch: integrated gradients: path points run at once (memory grows with it).
        remat: gradients: recompute each block's activations in the backward pass (less memory,
            one more forward of compute).
        progress: show progress bars (True), never (False), or when standard error is a
            terminal (None).
        log: record finished work here and replay what it holds (a resumable run,
            `jaxpatch.RunLog.open(folder, settings).task(name)`); the scores are bitwise those
            of a run without it.

    Example:
        >>> quiet = Execution(progress=False, chunk_size=8)
        >>> dataclasses.replace(quiet, chunk_size=None).progress
        False
    """

    chunk_size: int | None = None
    memory_fraction: float = 0.3
    materialize: bool | None = None
    prompt_batch: int | None = None
    step_batch: int = 1
    remat: bool = False
    progress: bool | None = None
    log: TaskLog | None = None

    def __post_init__(self) -> None:
        for name in ("chunk_size", "prompt_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"execution {name} must be a positive integer, got {value!r}")
        if not isinstance(self.step_batch, int) or self.step_batch < 1:
            raise InvalidInputError(f"execution step_batch must be a positive integer, got "
                                    f"{self.step_batch!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise InvalidInputError(f"execution memory_fraction must be in (0, 1], got "
                                    f"{self.memory_fraction!r}")

    def logging_to(self, log: TaskLog | None) -> Execution:
        """The same settings recording into `log` (a sub-task of a larger run).

        Example:
            >>> Execution(chunk_size=4).logging_to(None).chunk_size
            4
        """
        return dataclasses.replace(self, log=log)

    def sub(self, name: str) -> Execution:
        """The same settings recording into the sub-task `name` of this log (no log: none).

        Example:
            >>> Execution().sub("verify").log is None
            True
        """
        return self.logging_to(None if self.log is None else self.log.sub(name))

    def recorded(self, key: str, kind: Any, compute: Callable[[Execution], Any]) -> Any:
        """A whole result recorded in the log under `key` and read back on a resumed run:
        `compute(settings without the log)`, kept as `kind.to_dict()` and rebuilt with
        `kind.from_dict` (exactly: floats round-trip through JSON). Without a log, computed.

        Example:
            >>> class Box(int):
            ...     to_dict = lambda self: int(self)
            ...     from_dict = classmethod(lambda cls, data: cls(data))
            >>> Execution().recorded("k", Box, lambda settings: Box(3))
            3
        """
        if self.log is None:
            return compute(self)
        return kind.from_dict(self.log.memo(key, lambda: compute(self.logging_to(None)).to_dict()))

    def provenance(self) -> dict[str, Any]:
        """The settings as JSON values (what a result records; the log is not a setting).

        Example:
            >>> Execution(chunk_size=8).provenance()["chunk_size"]
            8
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "log"}


def execution_of(execution: Execution | None) -> Execution:
    """`execution`, or the default settings for None.

    Example:
        >>> execution_of(None) == Execution()
        True
    """
    return Execution() if execution is None else execution
