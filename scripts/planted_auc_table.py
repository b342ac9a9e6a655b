"""The README's localization table: every method's ROC AUC against the planted set, over seeds.

For each seed, trains a planted pair from scratch (`experiments.planted`, donor only), scores
every method with `jaxpatch.evaluate`, and writes the table (mean and min-max over seeds) into
README.md between its markers, plus the per-seed numbers into docs/planted_auc.json.

    python scripts/planted_auc_table.py --seeds 0 1 2

About 4 minutes per seed on 2 CPU cores.
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
from jaxpatch.evaluate import GRANULARITIES, METHODS, evaluate, load_planted  # noqa: E402
from jaxpatch.io.fingerprint import checkpoint_fingerprint  # noqa: E402
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
    for m in METHODS:
        lines.append("| " + " | ".join([METHOD_LABELS[m], *(cell([r["auc"][g][m] for r in runs])
                                                              for g in GRANULARITIES)]) + " |")
    acc = lambda key: cell([r["behavior"][key] for r in runs])  # noqa: E731
    recall = cell([r["narrow_then_verify"]["recall"] for r in runs])
    share = runs[0]["narrow_then_verify"]["verified_fraction"]
    lines += ["", "Task accuracy, mean (min-max): base " + acc("base") + ", donor " + acc("donor")
              + ", base with S from the donor " + acc("base_with_S_from_donor")
              + ", donor with S from the base " + acc("donor_with_S_from_base") + ".",
              f"Narrow-then-verify (integrated gradients, exact patches on {share:.0%} of the neurons): "
              f"recall of the exhaustive exact top 20 {recall}."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "planted_auc.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        runs = [run_seed(seed, Path(work)) for seed in args.seeds]
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
    Path(args.json).write_text(json.dumps({"settings": dataclasses.asdict(Settings()), "runs": runs},
                                          indent=1) + "\n")
    print(f"wrote the table into {readme} and the runs into {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
