"""JAX's persistent compilation cache, on by default for the `jaxpatch` command: a program
compiled once is read back by every later process with the same shapes, settings and JAX
version.

Importing jaxpatch changes no global JAX setting (a library embedded in someone's JAX code must
not). The command turns the cache on (`from_environment`) unless a cache folder is configured
already; in Python, `jaxpatch.enable_compile_cache()` (or `from_environment()`) does:

    JAXPATCH_COMPILE_CACHE unset     the per-user folder, `$XDG_CACHE_HOME/jaxpatch/xla`
                                     (`~/.cache/jaxpatch/xla` without XDG_CACHE_HOME)
    JAXPATCH_COMPILE_CACHE=DIR       that folder
    JAXPATCH_COMPILE_CACHE=0         off (also "off", "false", or empty)

The command line takes `--compile-cache DIR` and `--no-compile-cache` ahead of the command.
Every program is cached, however short its compilation (the small programs of a sweep add up).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["ENVIRONMENT_VARIABLE", "default_cache_dir", "enable", "disable", "from_environment"]

ENVIRONMENT_VARIABLE = "JAXPATCH_COMPILE_CACHE"
_OFF = ("0", "off", "false", "")


def default_cache_dir() -> Path:
    """The per-user cache folder: `$XDG_CACHE_HOME/jaxpatch/xla`, else `~/.cache/jaxpatch/xla`.

    Example:
        >>> default_cache_dir().parts[-2:]
        ('jaxpatch', 'xla')
    """
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "jaxpatch" / "xla"


def enable(path: str | os.PathLike[str] | None = None) -> Path:
    """Turns the persistent compilation cache on, in `path` (default: `default_cache_dir()`).

    Returns:
        The folder used.

    Example:
        >>> import tempfile
        >>> folder = enable(tempfile.mkdtemp())
        >>> jax.config.jax_compilation_cache_dir == str(folder)
        True
        >>> disable()  # as the test suite runs
    """
    folder = Path(path) if path is not None else default_cache_dir()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def disable() -> None:
    """Turns the persistent compilation cache off for this process.

    Example:
        >>> disable()
        >>> jax.config.jax_enable_compilation_cache
        False
    """
    jax.config.update("jax_enable_compilation_cache", False)


def from_environment() -> Path | None:
    """What the `jaxpatch` command does: the cache as `JAXPATCH_COMPILE_CACHE` says (see the module
    docstring), unless a cache folder is configured already.

    Returns:
        The folder in use, or None when off.

    Example:
        >>> import os
        >>> os.environ[ENVIRONMENT_VARIABLE] = "off"  # as the test suite runs
        >>> from_environment() is None
        True
    """
    setting = os.environ.get(ENVIRONMENT_VARIABLE)
    if setting is not None and setting.strip().lower() in _OFF:
        disable()
        return None
    configured = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if configured and setting is None:
        return Path(configured)
    return enable(setting)
