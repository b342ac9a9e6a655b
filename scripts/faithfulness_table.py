"""Faithfulness of every localization method on the shipped planted pair (module granularity).

Rankings from exact weight patching (both directions, by the size of the effect), first-order
and integrated-gradient attribution, activation patching (both directions), a learned patch's
gate probabilities, greedy forward selection and backward elimination by exact patching, |dW|,
a band of random rankings, and the planted set S first (the reference a method is held to:
S's modules in their order, then the rest). Each is scored by its faithfulness curve
(`jaxpatch.faithfulness`) in both directions on the sizes 0, 1, 2, 4, ..., n, with the log-
probability of the answers as the behavior; each method's cost is its candidate runs (at most
one forward pass each) or optimizer steps.

    python scripts/faithfulness_table.py [--out docs]   # prints the table; writes faithfulness.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxpatch  # noqa: E402
from jaxpatch import Execution, GateTraining, LogProb, prepare  # noqa: E402
from jaxpatch.faithfulness import faithfulness_curve, ranking  # noqa: E402
from jaxpatch.modes import PairDirection  # noqa: E402
from jaxpatch.prompts import make_batch  # noqa: E402
from jaxpatch.selection import backward_elimination, greedy_forward  # noqa: E402
from jaxpatch.studies.evaluate import default_pair_dir, load_planted  # noqa: E402
from jaxpatch.studies.scoring import plant_patch, planted_labels  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", help="folder for faithfulness.json (every curve)")
    parser.add_argument("--random", type=int, default=10, help="random rankings in the band")
    args = parser.parse_args()
    planted = load_planted(default_pair_dir())
    config = planted.base.config
    pair = prepare(planted.base, planted.donor, make_batch(config, planted.prompts, "targets"),
                   positions="targets")
    metric, quiet = LogProb(), Execution(progress=False)
    items = jaxpatch.select(config, None, "module")
    names = [c.name for c in items]
    inside = dict(zip(names, planted_labels(config, plant_patch(config, planted.plant), items)))
    costs: dict[str, str] = {}
    rankings: dict[str, list[str]] = {}

    def timed(label: str, cost: str, make) -> None:
        start = time.perf_counter()
        rankings[label] = make()
        costs[label] = f"{cost}, {time.perf_counter() - start:.1f} s"

    n = len(names)
    timed("S first (reference)", "-", lambda: [x for x in names if inside[x]]
          + [x for x in names if not inside[x]])
    directions: tuple[PairDirection, PairDirection] = ("denoise", "noise")

    def exact(direction: PairDirection) -> list[str]:
        return ranking(jaxpatch.sweep(pair, metric, direction=direction, execution=quiet), "size")

    def activation(direction: PairDirection) -> list[str]:
        return ranking(jaxpatch.activation_patching(pair, metric, direction=direction,
                                                    execution=quiet), "size")

    for direction in directions:
        timed(f"exact {direction}", f"{n} runs", functools.partial(exact, direction))
        timed(f"activation {direction}", f"{n} runs", functools.partial(activation, direction))
    timed("first-order", "1 gradient", lambda: ranking(
        jaxpatch.attribute(pair, metric, execution=quiet), "size"))
    timed("integrated gradients (16)", "16 gradients", lambda: ranking(jaxpatch.attribute(
        pair, metric, method="integrated-gradients", execution=quiet), "size"))
    timed("learned patch (gates)", "200 steps", lambda: ranking(dict(zip(names, jaxpatch.learn_patch(
        pair, metric, sparsity=0.1 / n, training=GateTraining(steps=200)).probabilities))))
    selections = {}

    def selected(label: str, method) -> list[str]:
        selections[label] = method(pair, metric, execution=quiet)
        return selections[label].order

    runs = n * (n + 1) // 2 - 1  # every step one sweep of the remaining candidates
    timed("greedy forward (exact)", f"{runs} runs", lambda: selected("forward", greedy_forward))
    timed("backward elimination (exact)", f"{runs} runs",
          lambda: selected("backward", backward_elimination))
    timed("|dW|", "-", lambda: ranking(dict(zip(names, jaxpatch.delta_norms(
        config, planted.base.params, planted.donor.params, items))), "size"))
    rng = np.random.default_rng(0)
    shuffles = [list(rng.permutation(names)) for _ in range(args.random)]

    table: dict[str, dict[str, dict]] = {}
    for direction in directions:
        table[direction] = {label: faithfulness_curve(pair, metric, order, direction=direction,
                                                      label=label, execution=quiet).to_dict()
                            for label, order in rankings.items()}
        band = [faithfulness_curve(pair, metric, order, direction=direction, execution=quiet).to_dict()
                for order in shuffles]
        table[direction][f"random ({args.random})"] = {
            "cpr": float(np.mean([b["cpr"] for b in band])),
            "cpr_range": [min(b["cpr"] for b in band), max(b["cpr"] for b in band)],
            "cmd": float(np.mean([b["cmd"] for b in band])),
            "sizes": band[0]["sizes"], "faithfulness": np.mean(
                [b["faithfulness"] for b in band], axis=0).tolist()}
    k = sum(inside.values())
    lines = [f"planted pair: {planted.task} task, {n} modules, |S| = {k} modules; log-probability "
             "of the answers; sizes " + ", ".join(map(str, table["denoise"]["|dW|"]["sizes"])), "",
             "| ranking | cost | CPR denoise | CMD denoise | CPR noise | CMD noise |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label in table["denoise"]:
        d, z = table["denoise"][label], table["noise"][label]
        cost = costs.get(label, f"{args.random} shuffles")
        spread = (f" ({d['cpr_range'][0]:.3f}-{d['cpr_range'][1]:.3f})" if "cpr_range" in d else "")
        shown = label.replace("|", "\\|")  # a pipe inside a markdown table cell
        lines.append(f"| {shown} | {cost} | {d['cpr']:.3f}{spread} | {d['cmd']:.3f} | "
                     f"{z['cpr']:.3f} | {z['cmd']:.3f} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        (out / "faithfulness.json").write_text(json.dumps(
            {"pair": str(planted.folder.name), "metric": metric.name, "curves": table,
             "costs": costs, "greedy_forward": selections["forward"].to_dict(),
             "backward_elimination": selections["backward"].to_dict()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
