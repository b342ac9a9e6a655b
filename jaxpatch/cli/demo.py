"""The demo and its report: every localization method on the shipped planted pair."""

from __future__ import annotations

import argparse
from typing import Any

from jaxpatch.cli.common import Command, check_output

__all__ = ["register"]


def register(command: Command) -> None:
    """Adds this group's commands to the parser."""
    p = command("demo", _demo, "score every localization method on the shipped planted pair and "
                "write an HTML report")
    p.add_argument("--pair", help="a planted pair folder (default: the shipped pair; make others "
                   "with `python -m experiments.planted`)")
    p.add_argument("--out", default="jaxpatch-demo", help="output folder (default ./jaxpatch-demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (an earlier demo run is always replaced)")
    p.add_argument("--granularity", action="append", choices=["module", "head", "neuron"],
                   help="granularities to score (repeatable; default all three)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline and controls")
    p.add_argument("--stage", action="append", metavar="NAME",
                   help="run only these stages (repeatable; default all: narrow-then-verify, the "
                        "methods, hierarchy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = command("report", _report, "re-render report.html from a demo run's saved results")
    p.add_argument("run_dir", help="a folder written by `jaxpatch demo`")


def _demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tqdm.auto import tqdm

    from jaxpatch.modes import SCORED_GRANULARITIES
    from jaxpatch.studies.evaluate import default_pair_dir, evaluate, load_planted, stage_count
    from jaxpatch.studies.report import summary_lines, write_run

    out = Path(args.out)
    earlier_run = (out / "results.json").is_file() and (out / "report.html").is_file()
    check_output(args.out, args.overwrite or earlier_run)
    pair = load_planted(args.pair or default_pair_dir())
    granularities = tuple(args.granularity or SCORED_GRANULARITIES)
    count = stage_count(granularities)
    stages = iter(range(1, count + 1))

    def stage(name: str, total: int) -> Any:
        return tqdm(total=total, desc=f"[{next(stages)}/{count}] {name}", unit="step",
                    disable=args.no_progress, dynamic_ncols=True, leave=True)

    evaluation = evaluate(pair, granularities=granularities, seed=args.seed, stages=args.stage,
                          stage=stage)
    write_run(evaluation.summary, evaluation.results, out, overwrite=True)
    print(f"report: {out / 'report.html'} (results.json, auc.csv and scores/ beside it)")
    print("\n".join(summary_lines(evaluation.summary)))


def _report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from jaxpatch.runs.atomic import atomic_write_bytes
    from jaxpatch.studies.report import read_run, render_html

    summary, results = read_run(args.run_dir)
    target = Path(args.run_dir) / "report.html"
    atomic_write_bytes(target, render_html(summary, results).encode())
    print(f"wrote {target}")
