"""The `jaxpatch` command: one file per command group.

    demo.py       demo, report           the shipped planted pair, scored by every method
    models.py     info, forward, convert one checkpoint
    scoring.py    sweep, attribute, localize, learn, trace   components of a base/donor pair
    faithfulness.py  faithfulness         curves of rankings, against |dW| and random
    merging.py    merge, merge-eval
    common.py     the scoring commands' flags, the prepared run, the progress log, outputs

Every subcommand turns a `JaxpatchError` into one line on stderr and exit status 2;
`--debug` shows the traceback instead. Ctrl-C (SIGINT) or SIGTERM stops a command with one line
saying what was kept and the command that resumes it, and the shell's status for the signal
(130, 143); a closed output pipe (`jaxpatch info ... | head -1`) ends it quietly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxpatch.cli import demo, faithfulness, merging, models, scoring
from jaxpatch.errors import JaxpatchError

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is (so it stops like Ctrl-C)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `jaxpatch` command line.

    Arguments:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status (0 on success, 2 on bad input).

    Example:
        >>> main(["info", str(fixtures / "gpt2")])  # doctest: +ELLIPSIS
        /.../gpt2: gpt2, 29,568 params (float32)
          layers 2, d_model 32, heads 4 x 8, kv heads 4 [MHA], d_ff 128, vocab 96, context 32
          tokenizer: yes
          chat template: none
        0
        >>> main(["info", str(tmp / "missing")])  # one line on stderr, status 2
        2
    """
    from jaxpatch import compile_cache

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.no_compile_cache:
        compile_cache.disable()
    elif args.compile_cache:
        compile_cache.enable(args.compile_cache)
    else:  # on by default for the command (not for the library: see jaxpatch.compile_cache)
        compile_cache.from_environment()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous = None
    try:
        if args.distributed:
            from jaxpatch.mesh import initialize_distributed

            initialize_distributed()
        args.run(args)
    except JaxpatchError as e:
        if args.debug:
            traceback.print_exc()
        print(f"jaxpatch: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        if args.debug:
            traceback.print_exc()
        terminated = isinstance(e, _Terminated)
        print(f"jaxpatch: {'terminated' if terminated else 'interrupted'}; "
              f"{interrupted_state(args, sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except BrokenPipeError:  # the reader went away (`| head`): not an error of the command
        try:  # so the interpreter's final flush of stdout stays quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file
            pass
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def interrupted_state(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """What an interrupted command kept, and how to resume it, in one line.

    Example:
        >>> interrupted_state(argparse.Namespace(out=None), ["info", "x"])
        'nothing was written'
    """
    from jaxpatch.runs.log import LOG_NAME

    out = getattr(args, "out", None)
    log = Path(out) / LOG_NAME if out else None
    if log is None or not log.is_file():
        return "nothing was written"
    with open(log, "rb") as f:
        records = max(0, sum(1 for line in f if line.endswith(b"\n")) - 1)  # less the header
    again = shlex.join(["jaxpatch", *(a for a in argv if a != "--overwrite")])
    return (f"the {records} records of its progress in {out} are kept; "
            f"resume with the same command: {again}")


def one_line(message: str) -> str:
    """Collapses a message onto one line.

    Example:
        >>> one_line("a\\n  b")
        'a b'
    """
    return " ".join(message.split())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `jaxpatch` command.

    Example:
        >>> build_parser().parse_args(["info", "x"]).checkpoint
        'x'
    """
    parser = argparse.ArgumentParser(
        prog="jaxpatch",
        description="Weight patching in JAX: find which parameters are the source of a capability.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR",
                       help="JAX's persistent compilation cache folder (default: "
                       "$JAXPATCH_COMPILE_CACHE, else ~/.cache/jaxpatch/xla)")
    cache.add_argument("--no-compile-cache", action="store_true",
                       help="do not read or write compiled programs")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run first (jax.distributed: "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or SLURM, "
                        "Open MPI, Cloud TPU); every process runs the same command, the first "
                        "writes the results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        p.set_defaults(run=run)
        return p

    for group in (demo, models, scoring, faithfulness, merging):
        group.register(command)
    return parser
