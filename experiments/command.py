"""The command line every pair builder shares: its settings as flags, an output folder (the user
cache by default), and one-line refusals."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxpatch.errors import JaxpatchError

__all__ = ["run_builder", "add_settings_flags", "settings_from"]


def run_builder(argv: Sequence[str] | None, prog: str, doc: str | None, settings_class: type,
                build: Callable[[Any], dict], write: Callable[[dict, Path, bool], None],
                default_out: Callable[[int], Path]) -> int:
    """Parses `--out`, `--overwrite` and one flag per settings field, builds and writes.

    Arguments:
        argv: the arguments (None: the process's).
        prog, doc: the command's name and its module docstring (the first line is its help).
        settings_class: a dataclass with a default for every field, one of them `seed`.
        build: `build(settings) -> built`, raising `JaxpatchError` when a check fails.
        write: `write(built, out, overwrite)`, atomically.
        default_out: the folder a seed's pair goes to by default.

    Returns:
        The exit status: 0, or 2 after one line naming what failed (nothing is written).

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class S:
        ...     seed: int = 0
        >>> run_builder(["--out", str(tmp / "x")], "b", "A builder.", S,
        ...             lambda s: {"record": {"seconds": 0}}, lambda b, o, w: None,
        ...             lambda seed: tmp / "y")
        wrote ... (0 s)
        0
    """
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    p.add_argument("--out", help=f"folder to create (default: {default_out(0)} for seed 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    add_settings_flags(p, settings_class)
    args = p.parse_args(argv)
    settings = settings_from(args, settings_class)
    out = Path(args.out) if args.out else default_out(settings.seed)
    try:
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise JaxpatchError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        built = build(settings)
        write(built, out, args.overwrite)
    except JaxpatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({built['record']['seconds']} s)")
    return 0


def add_settings_flags(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One flag per field of a settings dataclass (`--answer-tokens` for `answer_tokens`), of
    the default's type, with the default in its help.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class S:
        ...     answer_tokens: int = 3
        >>> p = argparse.ArgumentParser()
        >>> add_settings_flags(p, S)
        >>> settings_from(p.parse_args(["--answer-tokens", "5"]), S)
        S(answer_tokens=5)
    """
    defaults = settings_class()
    for field in dataclasses.fields(settings_class):
        default = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default),
                            default=default, help=f"(default {default})")


def settings_from(args: argparse.Namespace, settings_class: type) -> Any:
    """The settings the flags of `add_settings_flags` were given."""
    return settings_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class)})
