"""docs/merging.md's study: `jaxpatch merge-eval` on the real experts fine-tuned from
google/gemma-3-270m (when built: `python -m experiments.experts`) and on the shipped planted
pair's experts (the hard case).

    python scripts/merging_study.py              # both; the real set resumes from its run folder
    python scripts/merging_study.py --planted    # the planted pair only (about a minute)

Each set's section of docs/merging.md (between its markers) is written from the merge-eval
document: the experts, the table, the best setting per method, the targets and what the scores
predicted; the documents go to docs/merge_eval.json (planted) and docs/merge_eval_real.json.
The real set's run is recorded in `<experts>-merge-eval/` beside the expert folder and resumed
there when interrupted.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxpatch.cli import main as jaxpatch_main  # noqa: E402
from jaxpatch.studies.evaluate import default_pair_dir  # noqa: E402
from jaxpatch.studies.merge_eval import DATA_FREE, summary, table  # noqa: E402

MARKERS = {"real": ("<!-- merge-eval-real:start -->", "<!-- merge-eval-real:end -->"),
           "planted": ("<!-- merge-eval-table:start -->", "<!-- merge-eval-table:end -->")}


def run(folder: Path, out: Path, eval_prompts: int) -> dict[str, Any]:
    """merge-eval on a set, recorded (and resumed) in `out`."""
    code = jaxpatch_main(["merge-eval", str(folder), "--out", str(out),
                          "--eval-prompts", str(eval_prompts)])
    if code != 0:
        raise SystemExit(f"merge-eval on {folder} failed (exit status {code})")
    return json.loads((out / "merge_eval.json").read_text())


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def section(document: dict[str, Any]) -> str:
    """A set's generated section: experts, table, best settings, targets, predictions, time."""
    s = summary(document)
    own, base = document["expert_accuracy"], document["base"]
    lines = ["Each expert alone (held-out accuracy) and the base: " + ", ".join(
        f"{t} {_pct(a)} (base {_pct(base['accuracy'][t])})" for t, a in own.items()) + "."]
    if document.get("expert_text_loss"):
        lines.append("General text loss (nats/token): base " f"{base['text_loss']:.3f}, " + ", ".join(
            f"{t} {v:.3f}" for t, v in document["expert_text_loss"].items()) + ".")
    items = document.get("held_out_items")
    if items:
        lines.append("Held-out items judged per task: " + ", ".join(
            f"{t} {n}" for t, n in items.items()) + "; one item is " + ", ".join(
            f"{100 / (n * own[t]):.0f}" for t, n in items.items() if own[t] > 0)
            + " points of normalized accuracy respectively, so margins of a point or two are "
            "one item, within noise.")
    lines += ["", "Average normalized accuracy (merged accuracy / the expert's own; worst task "
              "and chosen setting in parentheses; bold: the best of the column):", "",
              table(document), ""]
    chosen = collections.defaultdict(collections.Counter)
    for entry in document["combinations"].values():
        for method, row in entry["methods"].items():
            chosen[method][json.dumps(row["setting"], sort_keys=True)] += 1
    lines.append("Best setting per method (how often chosen over the combinations): " + "; ".join(
        f"{m} {', '.join(f'{k}' for k, _ in c.most_common(2))}" for m, c in chosen.items()
        if m in DATA_FREE or m.startswith("weight_patching (module")) + ".")
    lines.append("")
    best = s["best_data_free_on_pairs"]
    if best is not None:
        verdict = "met" if best[1] >= 0.5 else "**missed**"
        lines.append(f"- The benchmark discriminates (some data-free method keeps >= 50% on "
                     f"average over the pairs): {verdict}; best {best[0]} {_pct(best[1])}.")
    wins, combos = s["guided_wins"], s["combinations"]
    verdict = "met" if len(wins) * 3 >= 2 * len(combos) else "**missed**"
    lines.append(f"- Score-guided beats the best data-free merge by >= 3 points on at least two "
                 f"thirds of the combinations: {verdict} ({len(wins)} of {len(combos)}).")
    lines += ["", "| combination | best data-free | best score-guided | margin | over its rest "
              "| source overlap |", "|---|---|---|---|---|---|"]
    for c, v in combos.items():
        rest, gain = v["over_rest"]
        lines.append(f"| {c} | {v['best_data_free'][0]} {v['best_data_free'][1]:.2f} | "
                     f"{v['best_guided'][0]} {v['best_guided'][1]:.2f} | {v['margin']:+.2f} | "
                     f"{gain:+.2f} ({rest}) | {v['source_overlap']:.2f} |")
    lines += ["", "(margin: the best score-guided merge minus the best data-free one; over its "
              "rest: minus the merge its uncarried weights came from, the base scoring 0.)"]
    ranked = sorted(s["method_average"].items(), key=lambda kv: -kv[1])
    lines += ["", "Each method's mean over every combination (its best setting per combination): "
              + ", ".join(f"{m} {v:.2f}" for m, v in ranked) + "."]
    r = s["overlap_interference_correlation"]
    lines += ["", "Do experts whose sources overlap interfere more? Pearson's r between the "
              "module Jaccard overlap of two experts' carried sets and the interference "
              "(1 - the best data-free average) over the pairs: "
              + ("undefined (no variation)" if r is None else f"{r:+.2f}") + ".",
              "Does a score-guided merge keep what the localization says it keeps? Each "
              "expert's carried components alone, patched into the base (normalized): " + "; ".join(
                  f"{t} " + ", ".join(f"{g} {_pct(a)}" for g, a in v.items())
                  for t, v in s["carried_alone"].items()) + ".",
              "", timing(document)]
    return "\n".join(lines)


def timing(document: dict[str, Any]) -> str:
    """The run's time from what each piece recorded (a resumed run's pieces were timed when
    first computed)."""
    located = {t: v.get("seconds") for t, v in document["localization"].items()}
    combos = [v.get("seconds") for v in document["combinations"].values()]
    known = [x for x in [*located.values(), *combos] if x is not None]
    missing = [t for t, x in located.items() if x is None]
    line = (f"Time on this machine: {_duration(sum(known))} for "
            + ("the localizations and " if not missing else "")
            + f"every merge and judgment ({len(combos)} combinations)")
    if any(x is not None for x in located.values()):
        line += ("; localizing each expert: " + ", ".join(
            f"{t} {_duration(x)}" for t, x in located.items() if x is not None))
    if missing:
        line += f" (the localizations of {', '.join(missing)} were recorded without their time)"
    if None in combos:
        line += f" ({combos.count(None)} combinations were recorded without their time)"
    return line + f"; this call, replaying what was recorded: {_duration(document['seconds'])}."


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def movement(folder: Path) -> str:
    """How far each real expert moved and how much their changes overlap (`experts.json` and
    each `expert.json`)."""
    lines = []
    for record_file in sorted(folder.glob("*/expert.json")):
        record = json.loads(record_file.read_text())
        moved = record["movement"]
        loss = record["held_out_text_loss"]
        top = sorted(moved, key=lambda m: -moved[m])[:3]
        lines.append(f"- {record['skill']}: built in {record['seconds'] / 60:.0f} min; its checks "
                     f"(greedy replies, first line) {_pct(record['rates']['expert'])}, base "
                     f"{_pct(record['rates']['base'])}; held-out text loss {loss['base']:.3f} -> "
                     f"{loss['expert']:.3f}; relative movement: median "
                     f"{float(np.median([v for v in moved.values() if v > 0])):.4f}, most "
                     + ", ".join(f"{m} {moved[m]:.4f}" for m in top) + ".")
    summary_file = folder / "experts.json"
    if summary_file.is_file():
        overlap = json.loads(summary_file.read_text())["overlap"]
        lines.append("- Overlap of their changes (cosine of whole task vectors; Jaccard of the "
                     "tenth of modules each moved most): " + "; ".join(
                         f"{pair} {overlap['cosine'][pair]:+.3f} / "
                         f"{overlap['top_modules_jaccard'][pair]:.2f}"
                         for pair in overlap["cosine"]) + ".")
    return "\n".join(lines)


def write_section(name: str, text: str) -> None:
    doc = ROOT / "docs" / "merging.md"
    start, end = MARKERS[name]
    head, rest = doc.read_text().split(start)
    doc.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--planted", action="store_true", help="the planted pair only")
    p.add_argument("--experts", help="the real expert set (default: experiments.experts' seed 0)")
    p.add_argument("--eval-prompts", type=int, default=32,
                   help="held-out items per task of the real set (default 32)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        planted = run(default_pair_dir(), Path(tmp) / "planted", 128)
    planted["set"] = "jaxpatch/studies/pairs/default"
    (ROOT / "docs" / "merge_eval.json").write_text(json.dumps(planted, indent=1) + "\n")
    write_section("planted", section(planted))
    if args.planted:
        return 0
    from experiments.experts import default_out

    folder = Path(args.experts) if args.experts else default_out(0)
    if not (folder / "expert_set.json").is_file():
        print(f"{folder}: no expert set (python -m experiments.experts builds it)")
        return 1
    real = run(folder, folder.parent / f"{folder.name}-merge-eval", args.eval_prompts)
    real["set"] = "experiments.experts, seed 0"
    if (folder / "experts.json").is_file():
        real["overlap"] = json.loads((folder / "experts.json").read_text())["overlap"]
    (ROOT / "docs" / "merge_eval_real.json").write_text(json.dumps(real, indent=1) + "\n")
    write_section("real", movement(folder) + "\n\n" + section(real))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
