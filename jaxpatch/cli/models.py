"""The commands about one checkpoint: info, forward, convert."""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from jaxpatch.cli.common import Command
from jaxpatch.errors import InvalidInputError

__all__ = ["register"]

CHECKPOINT_HELP = ("Hugging Face or jaxpatch Orbax checkpoint folder, a .gguf file, or a Hugging "
                   "Face hub name (NAME or NAME@REVISION, read from the Hugging Face cache)")


def register(command: Command) -> None:
    """Adds this group's commands to the parser."""
    p = command("info", _info, "print a checkpoint's architecture and parameter count")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)

    p = command("forward", _forward, "run a forward pass and print the top next-token predictions")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="text to tokenize with the checkpoint's tokenizer.json")
    group.add_argument("--tokens", help="comma-separated token ids")
    p.add_argument("--top", type=int, default=5, help="how many predictions to print (default 5)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params")

    p = command("convert", _convert, "write a checkpoint in another format or dtype")
    p.add_argument("source", help=CHECKPOINT_HELP + " to read (never modified)")
    p.add_argument("destination", help="folder to create")
    p.add_argument("--format", choices=["hf", "orbax"], default="hf")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _info(args: argparse.Namespace) -> None:
    import jaxpatch
    from jaxpatch.io.hub import hub_revision

    model = jaxpatch.load(args.checkpoint)
    c = model.config
    attention = ("MHA" if c.n_kv_heads == c.n_heads else "MQA" if c.n_kv_heads == 1
                 else f"GQA ({c.queries_per_kv_head} query heads per kv head)")
    print(f"{args.checkpoint}: {c.family}, {jaxpatch.count_params(model.params):,} params ({c.dtype})")
    print(f"  layers {c.n_layers}, d_model {c.d_model}, heads {c.n_heads} x {c.head_dim}, "
          f"kv heads {c.n_kv_heads} [{attention}], d_ff {c.d_ff}, vocab {c.vocab_size}, "
          f"context {c.max_position_embeddings}")
    print(f"  tokenizer: {'yes' if model.tokenizer is not None else 'none'}")
    template = model.chat_template
    print(f"  chat template: {'none' if template is None else template.origin}")
    hub = hub_revision(model.source)
    if hub is not None:
        print(f"  hub: {hub[0]} at commit {hub[1]} ({model.source})")


def _forward(args: argparse.Namespace) -> None:
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
    from jaxpatch.cli.common import check_output

    check_output(args.destination, args.overwrite, name="DST")  # before the source is read
    model = jaxpatch.load(args.source, dtype=args.dtype)
    jaxpatch.save(model, args.destination, format=args.format, overwrite=args.overwrite)
    print(f"wrote {args.destination} ({args.format}, {model.config.dtype})")
