"""Atomic outputs: a folder or file appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from jaxpatch.errors import OutputExistsError

__all__ = ["atomic_directory", "atomic_write_bytes"]


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False,
                     owned: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yields a temporary folder beside `path` that becomes `path` when the block succeeds.

    On any exception the temporary folder is removed and `path` is left as it was. Replacing an
    existing folder never deletes what jaxpatch did not write: its entries that the new folder
    does not hold and that `owned` does not claim are moved into the new folder first.

    Arguments:
        path: the folder to create.
        overwrite: replace an existing folder at `path` (else an existing, non-empty `path`
            raises `OutputExistsError` before anything is written).
        owned: which names in an existing folder jaxpatch wrote (and may drop, as a stale
            shard of an earlier checkpoint); default: only the names the new folder holds.

    Raises:
        OutputExistsError: `path` is an existing non-empty folder and `overwrite` is off, or a
            file (which is never replaced by a folder).

    Returns:
        A context manager yielding the temporary folder to write into.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_directory(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (target / "a.txt").read_text()
        'hi'
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: is a file, not a folder; choose a folder")
    if path.exists() and not overwrite and any(path.iterdir()):
        raise OutputExistsError(f"{path}: already exists; choose another path, or overwrite it "
                                "(--overwrite) to replace what jaxpatch wrote there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            for entry in (old / "x").iterdir():  # what jaxpatch did not write stays
                if not (path / entry.name).exists() and not (owned and owned(entry.name)):
                    os.replace(entry, path / entry.name)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes a file atomically (a temporary file beside it, then a rename).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.bin"
        >>> atomic_write_bytes(p, b"ok")
        >>> p.read_bytes()
        b'ok'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
