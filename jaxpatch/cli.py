"""The `jaxpatch` command.

Every subcommand turns a `JaxpatchError` into one line on stderr and exit status 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Callable, Sequence

from jaxpatch.errors import InvalidInputError, JaxpatchError

EXIT_BAD_INPUT = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `jaxpatch` command line.

    Arguments:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status (0 on success, 2 on bad input).

    Example:
        >>> main(["info", "tests/fixtures/gpt2"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.run(args)
    except JaxpatchError as e:
        if args.debug:
            traceback.print_exc()
        print(f"jaxpatch: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        p.set_defaults(run=run)
        return p

    p = command("info", _info, "print a checkpoint's architecture and parameter count")
    p.add_argument("checkpoint", help="Hugging Face or jaxpatch Orbax checkpoint folder")

    p = command("forward", _forward, "run a forward pass and print the top next-token predictions")
    p.add_argument("checkpoint", help="Hugging Face or jaxpatch Orbax checkpoint folder")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="text to tokenize with the checkpoint's tokenizer.json")
    group.add_argument("--tokens", help="comma-separated token ids")
    p.add_argument("--top", type=int, default=5, help="how many predictions to print (default 5)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params")

    p = command("convert", _convert, "write a checkpoint in another format or dtype")
    p.add_argument("source", help="checkpoint folder to read (never modified)")
    p.add_argument("destination", help="folder to create")
    p.add_argument("--format", choices=["hf", "orbax"], default="hf")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def _info(args: argparse.Namespace) -> None:
    import jaxpatch

    model = jaxpatch.load(args.checkpoint)
    c = model.config
    attention = ("MHA" if c.n_kv_heads == c.n_heads else "MQA" if c.n_kv_heads == 1
                 else f"GQA ({c.queries_per_kv_head} query heads per kv head)")
    print(f"{args.checkpoint}: {c.family}, {jaxpatch.count_params(model.params):,} params ({c.dtype})")
    print(f"  layers {c.n_layers}, d_model {c.d_model}, heads {c.n_heads} x {c.head_dim}, "
          f"kv heads {c.n_kv_heads} [{attention}], d_ff {c.d_ff}, vocab {c.vocab_size}, "
          f"context {c.max_position_embeddings}")
    print(f"  tokenizer: {'yes' if model.tokenizer is not None else 'none'}")


def _forward(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    import jaxpatch

    model = jaxpatch.load(args.checkpoint, dtype=args.dtype)
    if args.text is not None:
        tokens, _ = model.encode([args.text])
    else:
        try:
            tokens = np.asarray([[int(t) for t in args.tokens.split(",")]])
        except ValueError:
            raise InvalidInputError(f"--tokens {args.tokens!r}: expected comma-separated integers") from None
    if tokens.shape[1] == 0:
        raise InvalidInputError("the input is empty after tokenization")
    logits = model(tokens)[0, -1]
    probs = np.asarray(jax.nn.softmax(logits))
    top = np.argsort(-probs)[: args.top]
    print(f"input: {tokens.shape[1]} tokens {tokens[0].tolist()}")
    for rank, token in enumerate(top, 1):
        piece = model.tokenizer.id_to_token(int(token)) if model.tokenizer is not None else None
        print(f"  {rank}. token {int(token):>6} {json.dumps(piece) if piece else '':>12}  "
              f"p={probs[token]:.4f}")


def _convert(args: argparse.Namespace) -> None:
    import jaxpatch

    model = jaxpatch.load(args.source, dtype=args.dtype)
    jaxpatch.save(model, args.destination, format=args.format, overwrite=args.overwrite)
    print(f"wrote {args.destination} ({args.format}, {model.config.dtype})")


if __name__ == "__main__":
    sys.exit(main())
