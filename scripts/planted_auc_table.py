"""The README's localization table: every method's ROC AUC against the planted set, over seeds.

For each seed, trains a planted pair from scratch (`experiments.planted`, donor only), scores
every method with `jaxpatch.evaluate`, and writes the table (mean and min-max over seeds) into
README.md between its markers, plus the per-seed numbers into docs/planted_auc.json.

    python scripts/planted_auc_table.py --seeds 0 1 2     # about 4 minutes per seed on 2 cores
    python scripts/planted_auc_table.py --render          # the table again from the saved runs

It also says whether seed 0, retrained here, reproduces the shipped pair's donor bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.planted import Settings, build, write  # noqa: E402
from jaxpatch.evaluate import EVALUATED_METHODS, default_pair_dir, evaluate, load_planted  # noqa: E402
from jaxpatch.io.fingerprint import checkpoint_fingerprint  # noqa: E402
from jaxpatch.modes import SCORED_GRANULARITIES as GRANULARITIES  # noqa: E402
from jaxpatch.report import METHOD_LABELS  # noqa: E402

START, END = "<!-- planted-auc-table:start -->", "<!-- planted-auc-table:end -->"


def run_seed(seed: int, work: Path) -> dict:
    folder = work / f"seed-{seed}"
    write(build(Settings(seed=seed, experts=())), folder)
    pair = load_planted(folder)
    summary = evaluate(pair, seed=seed).summary
    return {"seed": seed, "donor_sha256": checkpoint_fingerprint(pair.donor),
            "behavior": summary["behavior"], "narrow_then_verify": summary["narrow_then_verify"],
            "auc": {g: summary["granularities"][g]["auc"] for g in GRANULARITIES},
            "positives": {g: f"{sum(summary['granularities'][g]['planted'])}/"
                             f"{len(summary['granularities'][g]['names'])}" for g in GRANULARITIES}}


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def table(runs: list[dict]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    head = ["method", *(f"{g} ({runs[0]['positives'][g]} in S)" for g in GRANULARITIES)]
    lines = [f"ROC AUC against the planted set, mean (min-max) over seeds {seeds}:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in EVALUATED_METHODS:
        lines.append("| " + " | ".join([METHOD_LABELS[m], *(cell([r["auc"][g][m] for r in runs])
                                                              for g in GRANULARITIES)]) + " |")
    acc = lambda key: cell([r["behavior"][key] for r in runs])
    recall = cell([r["narrow_then_verify"]["recall"] for r in runs])
    ratio = cell([r["behavior"]["base_with_S_from_donor"] / r["behavior"]["donor"] for r in runs])
    share = runs[0]["narrow_then_verify"]["verified_fraction"]
    lines += ["", "Task accuracy, mean (min-max): base " + acc("base") + ", donor " + acc("donor")
              + ", base with S from the donor " + acc("base_with_S_from_donor")
              + f", that is {ratio} of the donor's; donor with S from the base "
              + acc("donor_with_S_from_base") + ".",
              f"Narrow-then-verify (integrated gradients, exact patches on {share:.0%} of the neurons): "
              f"recall of the exhaustive exact top 20 {recall}."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "planted_auc.json"))
    p.add_argument("--render", action="store_true", help="only re-render the table from --json")
    args = p.parse_args()
    if args.render:
        runs = json.loads(Path(args.json).read_text())["runs"]
    else:
        with tempfile.TemporaryDirectory() as work:
            runs = [run_seed(seed, Path(work)) for seed in args.seeds]
        Path(args.json).write_text(json.dumps({"settings": dataclasses.asdict(Settings()),
                                               "runs": runs}, indent=1) + "\n")
        shipped = checkpoint_fingerprint(load_planted(default_pair_dir()).donor)
        for run in runs:
            if run["seed"] == Settings().seed:
                print("seed 0 retrained reproduces the shipped donor:", run["donor_sha256"] == shipped)
    text = table(runs)
    print(text)
    readme = Path(args.readme)
    content = readme.read_text()
    if START not in content or END not in content:
        print(f"{readme}: markers {START} / {END} not found; table not written", file=sys.stderr)
        return 2
    before, rest = content.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(f"{before}{START}\n{text}\n{END}{after}")
    print(f"wrote the table into {readme}" + ("" if args.render else f" and the runs into {args.json}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
