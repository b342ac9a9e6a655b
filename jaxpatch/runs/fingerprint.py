"""Fingerprints that identify a run's inputs: checkpoints, prompts, versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpatch._version import __version__

__all__ = ["file_sha256", "folder_sha256", "checkpoint_fingerprint", "versions"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, streamed.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x"
        >>> _ = p.write_bytes(b"")
        >>> file_sha256(p)[:8]
        'e3b0c442'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """A SHA-256 over a folder's files: their relative names and contents, in name order.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> empty = folder_sha256(d)
        >>> _ = (d / "a").write_bytes(b"x")
        >>> folder_sha256(d) != empty
        True
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def checkpoint_fingerprint(model: Any) -> str:
    """A SHA-256 identifying a model: over its checkpoint folder's files (names and bytes) when
    it was loaded from one, else over its params.

    Example:
        >>> import jax.numpy as jnp
        >>> from types import SimpleNamespace
        >>> len(checkpoint_fingerprint(SimpleNamespace(source=None, params={"w": jnp.ones(2)})))
        64
    """
    if model.source is not None and Path(model.source).is_dir():
        return folder_sha256(model.source)
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(model.params):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of jaxpatch and the libraries its numbers depend on.

    Example:
        >>> "jax" in versions()
        True
    """
    return {"jaxpatch": __version__, "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
            "numpy": np.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
