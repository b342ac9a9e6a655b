"""The `faithfulness` command: faithfulness curves of rankings against |dW| and random rankings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxpatch.cli.common import (
    Command,
    add_patch_at_argument,
    add_run_arguments,
    execution_of,
    prepare_run,
    run_chat_template,
    run_log,
    write_outputs,
)
from jaxpatch.errors import InvalidInputError
from jaxpatch.modes import PairDirection

__all__ = ["register"]


def register(command: Command) -> None:
    """Adds this group's commands to the parser."""
    p = command("faithfulness", _faithfulness, "faithfulness curves (f(k), CPR, CMD) of rankings: "
                "the top k components patched together, against |dW| and random rankings")
    add_run_arguments(p, direction=False)
    add_patch_at_argument(p)
    p.add_argument("--ranking", action="append", metavar="SCORES_JSON",
                   help="a scores.json of sweep, attribute or localize to rank by (repeatable; "
                   "default: an exact denoise sweep run here)")
    p.add_argument("--by", choices=["effect", "size"], default="size",
                   help="rank by the signed effect or by its size |effect| (default size)")
    p.add_argument("--direction", choices=["denoise", "noise", "both"], default="both",
                   help="top k from the donor into the base, from the base into the donor, or "
                   "both (default both)")
    p.add_argument("--sizes", help="comma-separated k to measure (default 1, 2, 4, ... and n)")
    p.add_argument("--random", type=int, default=5,
                   help="random rankings drawn for the band (default 5; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rankings (default 0)")
    p.add_argument("--judge", metavar="VERIFIER",
                   help="judge each set by what the patched model writes: greedy continuations "
                   "of the prompts checked by VERIFIER (capitals, capital-share, lowercase, "
                   "no-commas, quoted, title, ends-with:PHRASE, words:MIN-MAX, sections:N, "
                   "highlighted:N); rankings still come from --metric (default: judged by "
                   "--metric itself)")
    p.add_argument("--new-tokens", type=int, default=16,
                   help="tokens generated per prompt for --judge (default 16)")


def _sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise InvalidInputError(f"--sizes {text!r}: expected comma-separated integers") from None


def _read_ranking(path: str, names: set[str], by: str) -> tuple[str, list[str]]:
    """A scores.json's label and ranking, refused in one line when it is not one of this
    model's components at this granularity."""
    from jaxpatch.faithfulness import ranking
    from jaxpatch.results import SweepResult

    try:
        result = SweepResult.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"{path}: not a jaxpatch scores.json ({type(e).__name__}: {e})") from None
    unknown = [n for n in result.names if n not in names]
    if unknown:
        raise InvalidInputError(f"{path}: {unknown[0]!r} is not a component of this model at the "
                                "chosen --granularity")
    return f"{result.method} {result.direction} ({result.metric})", ranking(result, by)  # type: ignore[arg-type]


def _judge(args: argparse.Namespace, pair: Any) -> Any:
    """The `TextJudge` that --judge names, on the run's prompts (decoded with the base's
    tokenizer)."""
    from jaxpatch.prompts import read_prompts
    from jaxpatch.verifiers import TextJudge, verifier_from_spec

    verifier = verifier_from_spec(args.judge)
    if args.new_tokens < 1:
        raise InvalidInputError(f"--new-tokens must be at least 1, got {args.new_tokens}")
    tokenizer = pair.base.tokenizer
    if tokenizer is None:
        raise InvalidInputError(f"--judge needs text: {args.base} has no tokenizer.json to decode "
                                "what the patched models write")
    prompts = read_prompts(args.prompts, tokenizer,
                           run_chat_template(args.chat_template, pair.base, pair.donor))
    return TextJudge(args.judge, verifier, prompts, args.new_tokens, tokenizer.decode)


def _faithfulness(args: argparse.Namespace) -> None:
    from jaxpatch.components import select
    from jaxpatch.engine import sweep
    from jaxpatch.faithfulness import faithfulness_curves, ranking
    from jaxpatch.figures import faithfulness_png
    from jaxpatch.pair import delta_norms

    if args.random < 0:
        raise InvalidInputError(f"--random must be at least 0, got {args.random}")
    sizes = _sizes(args.sizes)
    pair, metric, inputs = prepare_run(args)
    judge = metric if args.judge is None else _judge(args, pair)
    behavior = metric.name if args.judge is None else f"{args.judge} in generated text"
    if args.patch_at != "everywhere":
        behavior += f"; patches applied at the {args.patch_at} positions only"
    items = select(pair.config, args.select, args.granularity)
    names = [c.name for c in items]
    rankings = dict(_read_ranking(path, set(names), args.by) for path in args.ranking or [])
    directions: list[PairDirection] = (["denoise", "noise"] if args.direction == "both"
                                       else [args.direction])
    with run_log(args, inputs) as log:
        if not rankings:
            exact = sweep(pair, metric, candidates=items,
                          execution=execution_of(args, log, "exact denoise"))
            rankings["exact denoise"] = ranking(exact, args.by)
        norms = delta_norms(pair.config, pair.base.params, pair.donor.params, items)
        rankings["|dW|"] = ranking(dict(zip(names, norms.tolist())), "size")
        rng = np.random.default_rng(args.seed)
        shuffles = [list(rng.permutation(names)) for _ in range(args.random)]
        shuffled = {f"random {i}": order for i, order in enumerate(shuffles)}
        curves: dict[str, list[dict[str, Any]]] = {}
        bands: dict[str, list[dict[str, Any]]] = {}
        for direction in directions:
            scored = faithfulness_curves(pair, judge, {**rankings, **shuffled},
                                         granularity=args.granularity, direction=direction,
                                         sizes=sizes, execution=execution_of(args, log, direction))
            curves[direction] = [scored[label].to_dict() for label in rankings]
            bands[direction] = [scored[label].to_dict() for label in shuffled]
    print(f"behavior: {behavior}")
    print(f"{'ranking':40} {'direction':9} {'CPR':>6} {'CMD':>6}")
    for direction in directions:
        for c in curves[direction]:
            print(f"{c['label']:40} {direction:9} {c['cpr']:6.3f} {c['cmd']:6.3f}")
        if bands[direction]:
            cprs = [b["cpr"] for b in bands[direction]]
            print(f"{f'random ({len(cprs)})':40} {direction:9} {min(cprs):.3f}-{max(cprs):.3f}")
    if args.out:
        rows = ["ranking,direction,k,fraction,faithfulness"] + [
            f"{json.dumps(c['label'])},{d},{k},{k / c['components']},{f}"
            for d in directions for c in curves[d] + bands[d]
            for k, f in zip(c["sizes"], c["faithfulness"])]
        files: dict[str, bytes | str] = {"faithfulness.csv": "\n".join(rows) + "\n"}
        for direction in directions:
            files[f"faithfulness-{direction}.png"] = faithfulness_png(
                curves[direction], f"{direction}: {behavior}, {args.granularity} granularity",
                bands[direction])
        files["faithfulness.json"] = json.dumps(
            {"format": "jaxpatch.faithfulness/1", "metric": metric.name,
             "judge": None if args.judge is None else judge.describe(),
             "granularity": args.granularity, "by": args.by, "inputs": inputs,
             "curves": curves, "random": bands}, indent=1) + "\n"
        write_outputs(args.out, files)
