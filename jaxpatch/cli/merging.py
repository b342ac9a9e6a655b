"""The merging commands: merge (a mergekit YAML file) and merge-eval (a set of experts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxpatch.cli.common import Command, check_output, run_log, write_outputs
from jaxpatch.errors import InvalidInputError
from jaxpatch.runs.log import RunLog

__all__ = ["register"]


def register(command: Command) -> None:
    """Adds this group's commands to the parser."""
    p = command("merge", _merge, "merge models as a mergekit YAML file says (linear, "
                "task_arithmetic, ties, dare_linear, dare_ties, slerp) into a Hugging Face folder")
    p.add_argument("config", help="mergekit YAML: merge_method, base_model, models, parameters, dtype")
    p.add_argument("out", help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of random sparsification (DARE)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = command("merge-eval", _merge_eval, "merge a set of experts every way (data-free, "
                "score-guided, localize-and-stitch, TALL masks) and judge each task")
    p.add_argument("experts", help="a planted pair folder with experts "
                   "(jaxpatch/studies/pairs/default) or an expert set (expert_set.json)")
    p.add_argument("--out", required=True, help="folder for merge_eval.json and merge_eval.md "
                   "(progress recorded there; the same command resumes it)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="score-guided merges: an expert carries the components whose effect "
                   "reaches this share of its largest (default 0.1)")
    p.add_argument("--eval-prompts", type=int, default=128,
                   help="held-out items judged per task (default 128)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an existing --out folder")


def _merge(args: argparse.Namespace) -> None:
    import jaxpatch
    from jaxpatch.merge import merge_models, read_config

    check_output(args.out, args.overwrite, name="OUT")
    config = read_config(args.config)
    merged = merge_models(config, seed=args.seed, progress=not args.no_progress)
    jaxpatch.save(merged, args.out, overwrite=args.overwrite)
    print(f"merged {len(config.models)} model(s) into {config.base.name if config.base else 'none'}"
          f" with {config.method}: wrote {args.out}")


def _merge_eval(args: argparse.Namespace) -> None:
    from jaxpatch.runs.fingerprint import folder_sha256
    from jaxpatch.studies.merge_eval import merge_eval, table

    RunLog.check_folder(args.out, args.overwrite)
    if args.eval_prompts < 1:
        raise InvalidInputError(f"--eval-prompts must be at least 1, got {args.eval_prompts}")
    if not 0 < args.threshold <= 1:
        raise InvalidInputError(f"--threshold must lie in (0, 1], got {args.threshold}")
    if not Path(args.experts).is_dir():
        raise InvalidInputError(f"{args.experts}: expert folder not found")
    experts, out = Path(args.experts).resolve(), Path(args.out).resolve()
    if out == experts or experts in out.parents:
        raise InvalidInputError(f"--out {args.out} lies inside the expert folder {args.experts}, "
                                "which is read, never written: give a folder outside it")
    with run_log(args, {"experts": {"sha256": folder_sha256(args.experts)}}) as log:
        document = merge_eval(args.experts, threshold=args.threshold, eval_prompts=args.eval_prompts,
                              progress=lambda combo: print(f"merged {combo}", flush=True),
                              log=log.task("merge-eval") if log else None)
        markdown = table(document)
        print(markdown)
        write_outputs(args.out, {"merge_eval.md": markdown + "\n",
                                 "merge_eval.json": json.dumps(document, indent=1) + "\n"})
