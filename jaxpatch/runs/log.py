"""Resumable runs: an append-only log of finished work inside a run's output folder.

A long run (`sweep`, `attribute`, `localize`, `trace`, `merge-eval` with `--out DIR`) writes
`DIR/progress.jsonl` as it goes. Its first line names the run: the command, every setting that
changes a number, the inputs' SHA-256 fingerprints and the library versions and device kind.
Every later line is one finished piece of work:

    chunk   the raw scores of one chunk of candidates (names and values, bit for bit)
    memo    a finished sub-result (a plan decision, an attribution table, a merge)
    limit   a smaller chunk size chosen after running out of device memory

Each line is `<sha256 of the JSON> <JSON>`, written with one `write` on an append-only file
and flushed to disk before the run goes on, so a run killed at any moment (SIGKILL included)
leaves a log whose every complete line is intact; a torn last line is dropped when the run
starts again. Started again with the same command, a run replays the recorded chunks with
their exact boundaries and computes only what is missing, so its scores equal an
uninterrupted run's bit for bit (same device kind and versions; `docs/decisions/0016`).
Started against a folder whose log names other settings or inputs, it refuses and says what
differs.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxpatch.errors import (
    CorruptProgressError,
    OutputExistsError,
    OutputWriteError,
    RunMismatchError,
)

__all__ = ["LOG_NAME", "LOG_FORMAT", "RunLog", "TaskLog", "settings_differences", "encode_array",
           "decode_array", "writing", "memo"]

LOG_NAME = "progress.jsonl"
LOG_FORMAT = "jaxpatch.progress/1"


def encode_array(values: np.ndarray) -> dict[str, Any]:
    """An array as JSON: dtype, shape and its bytes in base64 (exact, bit for bit).

    Example:
        >>> x = np.array([0.1, -2.5], np.float32)
        >>> np.array_equal(decode_array(encode_array(x)), x)
        True
    """
    array = np.ascontiguousarray(values)
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_array(data: Mapping[str, Any]) -> np.ndarray:
    """The array `encode_array` wrote.

    Example:
        >>> decode_array({"dtype": "<f8", "shape": [1], "data": "AAAAAAAA8D8="}).tolist()
        [1.0]
    """
    dtype = np.dtype(data["dtype"])
    if dtype.hasobject:  # never build Python objects from a file
        raise ValueError(f"dtype {dtype} holds objects")
    raw = base64.b64decode(data["data"], validate=True)
    return np.frombuffer(raw, dtype).reshape(data["shape"]).copy()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (an empty mapping is a value of its own)."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two runs' settings, one phrase per dotted setting.

    Example:
        >>> settings_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}})
        ['a.c is 3 (the recorded run had 2)']
    """
    old, new = _flat(recorded), _flat(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            differences.append(f"{key} is {_short(new.get(key, '<unset>'))} "
                               f"(the recorded run had {_short(old.get(key, '<unset>'))})")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:20] + "..."


def _line(record: Mapping[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest().encode() + b" " + payload + b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record, or None when the line is not intact."""
    digest, _, payload = line.rstrip(b"\n").partition(b" ")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    try:
        record = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


class RunLog:
    """The progress log of one run in its output folder (see the module docstring).

    Use `RunLog.open` to create or resume one, `task(name)` for the view a method records
    into, and `close()` (or `with`) to release the folder's lock.

    Example:
        >>> log = RunLog.open(tmp / "run", {"command": "sweep", "seed": 0})
        >>> log.task("sweep").record_chunk(["a", "b"], np.array([1.0, 2.0]))
        >>> log.close()
        >>> again = RunLog.open(tmp / "run", {"command": "sweep", "seed": 0})
        >>> again.resumed, again.task("sweep").chunk_at("a")[1].tolist()
        (1, [1.0, 2.0])
        >>> again.close()
    """

    def __init__(self, folder: Path, records: list[dict[str, Any]], fd: int | None,
                 mirror: bool = False) -> None:
        self.path = folder / LOG_NAME
        self.records = records
        self.resumed = len(records)
        self._fd = fd
        self._mirror = mirror
        self._chunks: dict[tuple[str, str], tuple[list[str], np.ndarray]] = {}
        self._memos: dict[tuple[str, str], Any] = {}
        self._limits: dict[str, int] = {}
        for number, record in enumerate(records, 2):
            try:
                self._index(record)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise CorruptProgressError(f"{self.path}:{number}: malformed progress record "
                                           f"({type(e).__name__}); pass --overwrite to start the "
                                           "run afresh") from None

    @classmethod
    def check_folder(cls, folder: str | os.PathLike[str], overwrite: bool) -> None:
        """Refuses, before any work, a non-empty output folder that holds no progress log.

        Example:
            >>> RunLog.check_folder(tmp / "fresh", overwrite=False)  # nothing there: fine
        """
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise OutputExistsError(f"{path}: is a file, not a folder; choose a folder for --out")
        if path.exists() and not overwrite and (
                any(path.iterdir()) and not (path / LOG_NAME).is_file()):
            raise OutputExistsError(f"{path}: already exists and holds no jaxpatch progress log; "
                                    "choose another --out or pass --overwrite")

    @classmethod
    def open(cls, folder: str | os.PathLike[str], settings: Mapping[str, Any], *,
             overwrite: bool = False) -> RunLog:
        """Creates the log of a run, or opens it to resume.

        Arguments:
            folder: the run's output folder (created if missing).
            settings: JSON-able description of the run: command, settings, input
                fingerprints, versions. A recorded run with other settings is refused.
            overwrite: discard a recorded run instead of resuming or refusing it.

        Returns:
            The log, holding an exclusive lock on the folder until `close()`.

        Raises:
            OutputExistsError: the folder holds other files and no log.
            RunMismatchError: the log records a run with other settings (each difference named).
            CorruptProgressError: a line other than the last is damaged.
            OutputWriteError: the folder or log cannot be written.

        Example:
            >>> log = RunLog.open(tmp / "other", {"command": "sweep", "seed": 0})
            >>> log.close()
            >>> RunLog.open(tmp / "other", {"command": "sweep", "seed": 1})
            Traceback (most recent call last):
            ...
            jaxpatch.errors.RunMismatchError: ...seed is 1 (the recorded run had 0)...
        """
        path = Path(folder)
        cls.check_folder(path, overwrite)
        settings = json.loads(json.dumps(settings))  # what a reader of the log will see
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOG_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as e:
            raise _write_error(path / LOG_NAME, e, 0) from None
        try:
            _lock(fd, path)
            if overwrite:
                os.ftruncate(fd, 0)
            records = _read(fd, path / LOG_NAME)
            if not records:
                header = {"kind": "header", "format": LOG_FORMAT, "settings": settings}
                _append(fd, path / LOG_NAME, header, 0)
                return cls(path, [], fd)
            header, body = records[0], records[1:]
            if header.get("kind") != "header" or header.get("format") != LOG_FORMAT:
                raise CorruptProgressError(f"{path / LOG_NAME}: not a jaxpatch progress log of "
                                           f"format {LOG_FORMAT}; pass --overwrite to start fresh")
            recorded = header.get("settings", {})
            if isinstance(recorded, dict) and recorded.get("command") != settings.get("command"):
                raise RunMismatchError(
                    f"{path}: holds a `jaxpatch {recorded.get('command')}` run, not a "
                    f"`jaxpatch {settings.get('command')}` one: choose another --out, or pass "
                    "--overwrite to start afresh there")
            differences = settings_differences(recorded, settings)
            if differences:
                raise RunMismatchError(
                    f"{path}: holds the progress of another run: {'; '.join(differences)}. Use "
                    "the same command to resume, another --out, or --overwrite to start fresh")
            return cls(path, body, fd)  # refuses malformed records
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def mirror(cls, folder: str | os.PathLike[str], records: list[dict[str, Any]]) -> RunLog:
        """A log that replays `records` (another process's) and keeps what is appended in
        memory only: the other processes of a multi-process run, whose first process writes.

        Example:
            >>> log = RunLog.mirror(tmp / "elsewhere", [{"kind": "memo", "task": "t",
            ...                                          "key": "k", "value": 1}])
            >>> log.task("t").memo("k", lambda: 2), (tmp / "elsewhere").exists()
            (1, False)
        """
        return cls(Path(folder), list(records), None, mirror=True)

    def task(self, name: str) -> TaskLog:
        """The view of one task (a sweep, a sub-run of a trace) in this log.

        Example:
            >>> log = RunLog.open(tmp / "tasks", {})
            >>> log.task("a").memo("n", lambda: 3), log.task("a").memo("n", lambda: 4)
            (3, 3)
            >>> log.close()
        """
        return TaskLog(self, name)

    def close(self) -> None:
        """Releases the folder's lock (the log stays for a later resume).

        Example:
            >>> log = RunLog.open(tmp / "closed", {})
            >>> log.close()
            >>> RunLog.open(tmp / "closed", {}).resumed  # another run may now open it
            0
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _index(self, record: Mapping[str, Any]) -> None:
        kind, task = record.get("kind"), str(record.get("task"))
        if kind == "chunk":
            names = [str(n) for n in record["names"]]
            self._chunks[(task, names[0])] = (names, decode_array(record["values"]))
        elif kind == "memo":
            self._memos[(task, str(record["key"]))] = record["value"]
        elif kind == "limit":
            self._limits[task] = int(record["chunk"])

    def append(self, record: Mapping[str, Any]) -> None:
        """Appends one record and flushes it to disk (`TaskLog` writes the kinds it reads).

        Example:
            >>> with RunLog.open(tmp / "append", {}) as log:
            ...     log.append({"kind": "memo", "task": "t", "key": "k", "value": 1})
            ...     log.task("t").memo("k", lambda: 2)
            1
        """
        if self._fd is None and not self._mirror:
            raise ValueError("the run log is closed")
        if self._fd is not None:
            _append(self._fd, self.path, record, len(self._chunks))
        self.records.append(dict(record))
        self._index(record)


class TaskLog:
    """One task's records in a `RunLog`: chunks of scores, memos and a memory limit.

    Example:
        >>> with RunLog.open(tmp / "task", {}) as log:
        ...     t = log.task("sweep")
        ...     t.record_chunk(["x", "y"], np.array([0.5, 0.25], np.float32))
        ...     t.chunk_at("x")[0], t.chunk_at("y"), t.recorded_candidates()
        (['x', 'y'], None, 2)
    """

    def __init__(self, log: RunLog, name: str) -> None:
        self.log, self.name = log, name

    def sub(self, name: str) -> TaskLog:
        """The log of a part of this task (`"localize"` -> `"localize/verify"`).

        Example:
            >>> with RunLog.open(tmp / "sub", {}) as log:
            ...     log.task("localize").sub("verify").name
            'localize/verify'
        """
        return TaskLog(self.log, f"{self.name}/{name}")

    def chunk_at(self, first: str) -> tuple[list[str], np.ndarray] | None:
        """The recorded chunk that starts with candidate `first`: names and values.

        Example:
            >>> with RunLog.open(tmp / "at", {}) as log:
            ...     log.task("s").record_chunk(["a", "b"], np.array([1.0, 2.0]))
            ...     log.task("s").chunk_at("a")[0], log.task("other").chunk_at("a")
            (['a', 'b'], None)
        """
        return self.log._chunks.get((self.name, first))

    def replay(self, names: Sequence[str], offset: int) -> np.ndarray | None:
        """The recorded values of the chunk that starts at `names[offset]` and covers the
        names after it as recorded (None when there is none): the length of the result is
        the length of the recorded chunk.

        Example:
            >>> with RunLog.open(tmp / "replay", {}) as log:
            ...     t = log.task("s")
            ...     t.record_chunk(["b", "c"], np.array([1.0, 2.0]))
            ...     t.replay(["a", "b", "c"], 1).tolist(), t.replay(["b", "x"], 0)
            ([1.0, 2.0], None)
        """
        found = self.chunk_at(names[offset])
        if found is None or list(names[offset: offset + len(found[0])]) != found[0]:
            return None
        return found[1]

    def record_chunk(self, names: Sequence[str], values: np.ndarray) -> None:
        """Records one finished chunk's raw values (row i belongs to `names[i]`), bit for bit.

        Example:
            >>> with RunLog.open(tmp / "rec", {}) as log:
            ...     log.task("s").record_chunk(["a"], np.array([np.float32(0.1)]))
            ...     log.task("s").chunk_at("a")[1].dtype
            dtype('float32')
        """
        self.log.append({"kind": "chunk", "task": self.name, "names": list(names),
                         "values": encode_array(np.asarray(values))})

    def recorded_candidates(self) -> int:
        """How many candidates this task's recorded chunks hold.

        Example:
            >>> with RunLog.open(tmp / "count", {}) as log:
            ...     log.task("s").record_chunk(["a", "b"], np.zeros(2))
            ...     log.task("s").recorded_candidates(), log.task("t").recorded_candidates()
            (2, 0)
        """
        return sum(len(names) for (task, _), (names, _) in self.log._chunks.items()
                   if task == self.name)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """The recorded value of `key`, or `compute()` recorded (JSON-able; floats exact).

        Example:
            >>> with RunLog.open(tmp / "memo", {}) as log:
            ...     log.task("s").memo("x", lambda: {"v": 0.1}), log.task("s").memo("x", lambda: 2)
            ({'v': 0.1}, {'v': 0.1})
        """
        found = self.log._memos.get((self.name, key), _MISSING)
        if found is not _MISSING:
            return found
        value = json.loads(json.dumps(compute()))
        self.log.append({"kind": "memo", "task": self.name, "key": key, "value": value})
        return value

    @property
    def limit(self) -> int | None:
        """The chunk size this task fell back to after running out of memory, if it did.

        Example:
            >>> with RunLog.open(tmp / "limit", {}) as log:
            ...     before = log.task("s").limit
            ...     log.task("s").record_limit(8)
            ...     before, log.task("s").limit
            (None, 8)
        """
        return self.log._limits.get(self.name)

    def record_limit(self, chunk: int) -> None:
        """Records a smaller chunk size for the rest of this task (see `limit`)."""
        self.log.append({"kind": "limit", "task": self.name, "chunk": int(chunk)})


_MISSING = object()


def memo(log: TaskLog | None, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, recorded in (or read back from) `log` when there is one.

    Example:
        >>> memo(None, "x", lambda: 1)
        1
    """
    return compute() if log is None else log.memo(key, compute)


def _lock(fd: int, folder: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputExistsError(f"{folder}: another jaxpatch run is writing to this folder") from None


def _read(fd: int, path: Path) -> list[dict[str, Any]]:
    """Every intact record; a damaged or unfinished last line (a write torn by a kill) is cut
    off the file, damage anywhere else is refused."""
    size = os.fstat(fd).st_size
    lines = (os.pread(fd, size, 0) if size else b"").split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline
    records, offset = [], 0
    for number, line in enumerate(complete, 1):
        record = _parse(line)
        if record is None:
            if number == len(complete) and not tail:
                break
            raise CorruptProgressError(f"{path}:{number}: damaged progress record; pass "
                                       "--overwrite to start the run afresh")
        records.append(record)
        offset += len(line) + 1
    if offset != size:
        os.ftruncate(fd, offset)
    return records


def _append(fd: int, path: Path, record: Mapping[str, Any], finished: int) -> None:
    line = _line(record)
    start = os.fstat(fd).st_size
    try:
        if os.write(fd, line) != len(line):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):  # leave no torn line behind where we can
            os.ftruncate(fd, start)
        raise _write_error(path, e, finished) from None


def _write_error(path: Path, error: OSError, finished: int) -> OutputWriteError:
    return OutputWriteError(
        f"{path}: cannot write ({error.strerror or error}); the {finished} chunks recorded so "
        "far are kept: fix the folder and run the same command again to resume")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turns an OSError while writing `path` into one `OutputWriteError` line.

    Example:
        >>> with writing(tmp / "x.json"):
        ...     _ = (tmp / "x.json").write_text("{}")
    """
    try:
        yield
    except OSError as e:
        raise OutputWriteError(f"{path}: cannot write ({e.strerror or e}); recorded progress is "
                               "kept: run the same command again to finish") from None
