"""Faithfulness of every localization method on planted pairs, over seeds (module granularity),
and at head and neuron granularity on the shipped pair.

Rankings from exact weight patching (both directions, by the size of the effect), first-order
and integrated-gradient attribution, activation patching (both directions), a learned patch's
gate probabilities, greedy forward selection and backward elimination by exact patching, |dW|,
a band of random rankings, and the planted set S first (the reference a method is held to:
S's modules in their order, then the rest); and the hierarchy's sources as one set (a point).
Each is scored by its faithfulness curve (`jaxpatch.faithfulness`) in both directions on the
sizes 0, 1, 2, 4, ..., n, with the log-probability of the answers as the behavior; each
method's cost is its candidate runs (at most one forward pass each) or optimizer steps, and
its seconds.

Seed 0 is the shipped pair; other seeds are trained here (`experiments.planted`, with their
decoys, about 6 minutes each on 2 cores) into --pairs and reused from there.

At head and neuron granularity (the shipped pair): exact, first-order, a learned patch's gates,
greedy forward and backward elimination (heads: over every head; neurons: over the 64 neurons
first-order ranks highest, the rest after them in first-order order), |dW| and random; denoise.

    python scripts/faithfulness_table.py --seeds 0 1 2 3 4 --pairs /tmp/planted --out docs
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxpatch  # noqa: E402
from jaxpatch import Execution, GateTraining, LogProb, prepare  # noqa: E402
from jaxpatch.faithfulness import faithfulness_curves, ranking, set_points  # noqa: E402
from jaxpatch.hierarchy import trace_hierarchy  # noqa: E402
from jaxpatch.modes import Granularity, PairDirection  # noqa: E402
from jaxpatch.prompts import make_batch  # noqa: E402
from jaxpatch.selection import backward_elimination, greedy_forward  # noqa: E402
from jaxpatch.studies.evaluate import PlantedPair, default_pair_dir, load_planted  # noqa: E402
from jaxpatch.studies.scoring import plant_patch, planted_labels  # noqa: E402

SET_LEVEL = ("learned patch (gates)", "greedy forward (exact)", "backward elimination (exact)")
QUIET = Execution(progress=False)
METRIC = LogProb()
NARROWED = 64  # neurons greedy selection searches (the top by first-order attribution)


def planted_pair(seed: int, pairs: Path | None) -> PlantedPair:
    """Seed 0: the shipped pair; another seed: built into `pairs` once and reused."""
    if seed == 0:
        return load_planted(default_pair_dir())
    if pairs is None:
        raise SystemExit("--pairs FOLDER is needed for seeds other than 0")
    folder = pairs / f"seed-{seed}"
    if not (folder / "planted.json").is_file():
        from experiments.planted import Settings, build, write

        write(build(Settings(seed=seed, experts=())), folder)
    return load_planted(folder)


def _curves(pair: Any, rankings: dict[str, list[str]], granularity: Granularity,
            directions: tuple[PairDirection, ...], shuffles: list[list[str]]) -> dict:
    """Every ranking's curve per direction, and the random band's mean curve and CPR range."""
    table: dict[str, dict[str, dict]] = {}
    shuffled = {f"random {i}": order for i, order in enumerate(shuffles)}
    for direction in directions:
        curves = {label: c.to_dict() for label, c in faithfulness_curves(
            pair, METRIC, {**rankings, **shuffled}, granularity=granularity, direction=direction,
            execution=QUIET).items()}
        table[direction] = {label: curves[label] for label in rankings}
        band = [curves[label] for label in shuffled]
        table[direction][f"random ({len(shuffles)})"] = {
            "cpr": float(np.mean([b["cpr"] for b in band])),
            "cpr_range": [min(b["cpr"] for b in band), max(b["cpr"] for b in band)],
            "cmd": float(np.mean([b["cmd"] for b in band])),
            "sizes": band[0]["sizes"], "faithfulness": np.mean(
                [b["faithfulness"] for b in band], axis=0).tolist()}
    return table


def _timer(rankings: dict[str, list[str]], costs: dict[str, str]) -> Callable[..., None]:
    def timed(label: str, cost: str, make: Callable[[], list[str]]) -> None:
        start = time.perf_counter()
        rankings[label] = make()
        costs[label] = f"{cost}, {time.perf_counter() - start:.1f} s"
    return timed


def module_table(planted: PlantedPair, n_random: int) -> dict[str, Any]:
    """Every method's curves at module granularity on one planted pair (both directions), the
    hierarchy's sources as a set, and whether the best set-level method is within 0.1 of S."""
    config = planted.base.config
    pair = prepare(planted.base, planted.donor, make_batch(config, planted.prompts, "targets"),
                   positions="targets")
    items = jaxpatch.select(config, None, "module")
    names = [c.name for c in items]
    inside = dict(zip(names, planted_labels(config, plant_patch(config, planted.plant), items)))
    costs: dict[str, str] = {}
    rankings: dict[str, list[str]] = {}
    timed = _timer(rankings, costs)
    n = len(names)
    timed("S first (reference)", "-", lambda: [x for x in names if inside[x]]
          + [x for x in names if not inside[x]])
    directions: tuple[PairDirection, PairDirection] = ("denoise", "noise")

    def exact(direction: PairDirection) -> list[str]:
        return ranking(jaxpatch.sweep(pair, METRIC, direction=direction, execution=QUIET), "size")

    def activation(direction: PairDirection) -> list[str]:
        return ranking(jaxpatch.activation_patching(pair, METRIC, direction=direction,
                                                    execution=QUIET), "size")

    for direction in directions:
        timed(f"exact {direction}", f"{n} runs", functools.partial(exact, direction))
        timed(f"activation {direction}", f"{n} runs", functools.partial(activation, direction))
    timed("first-order", "1 gradient", lambda: ranking(
        jaxpatch.attribute(pair, METRIC, execution=QUIET), "size"))
    timed("integrated gradients (16)", "16 gradients", lambda: ranking(jaxpatch.attribute(
        pair, METRIC, method="integrated-gradients", execution=QUIET), "size"))
    timed("learned patch (gates)", "200 steps", lambda: ranking(dict(zip(names, jaxpatch.learn_patch(
        pair, METRIC, sparsity=0.1 / n, training=GateTraining(steps=200)).probabilities))))
    selections = {}

    def selected(label: str, method) -> list[str]:
        selections[label] = method(pair, METRIC, execution=QUIET)
        return selections[label].order

    runs = n * (n + 1) // 2 - 1  # every step one sweep of the remaining candidates
    timed("greedy forward (exact)", f"{runs} runs", lambda: selected("forward", greedy_forward))
    timed("backward elimination (exact)", f"{runs} runs",
          lambda: selected("backward", backward_elimination))
    timed("|dW|", "-", lambda: ranking(dict(zip(names, jaxpatch.delta_norms(
        config, planted.base.params, planted.donor.params, items))), "size"))
    start = time.perf_counter()
    sources = trace_hierarchy(pair, METRIC, execution=QUIET).with_role("source")
    traced_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    table = _curves(pair, rankings, "module", directions,
                    [list(rng.permutation(names)) for _ in range(n_random)])
    points = set_points(pair, METRIC, {"hierarchy sources": sources}, execution=QUIET)
    size, f = points["hierarchy sources"]
    s_cpr = table["denoise"]["S first (reference)"]["cpr"]
    best = max(SET_LEVEL, key=lambda m: table["denoise"][m]["cpr"])
    return {"seed": planted.record["settings"].get("seed"),
            "n": n, "planted": int(sum(inside.values())), "curves": table, "costs": costs,
            "hierarchy_sources": {"components": sources, "size": int(size), "faithfulness": float(f),
                                  "in_S": int(sum(inside[x] for x in sources)),
                                  "cost": f"trace_hierarchy, {traced_s:.1f} s"},
            "greedy_forward": selections["forward"].to_dict(),
            "backward_elimination": selections["backward"].to_dict(),
            "best_set_level": {"method": best, "cpr": float(table["denoise"][best]["cpr"]),
                               "s_cpr": float(s_cpr),
                               "within_0.1_of_S": bool(table["denoise"][best]["cpr"] >= s_cpr - 0.1)}}


def finer_table(planted: PlantedPair, granularity: Granularity, n_random: int) -> dict[str, Any]:
    """Denoise curves at head or neuron granularity: single-effect rankings against set-level
    selection, |dW| and random, with each method's cost."""
    config = planted.base.config
    pair = prepare(planted.base, planted.donor, make_batch(config, planted.prompts, "targets"),
                   positions="targets")
    items = jaxpatch.select(config, None, granularity)
    names = [c.name for c in items]
    costs: dict[str, str] = {}
    rankings: dict[str, list[str]] = {}
    timed = _timer(rankings, costs)
    n = len(names)
    timed("exact denoise", f"{n} runs", lambda: ranking(jaxpatch.sweep(
        pair, METRIC, granularity=granularity, execution=QUIET), "size"))
    timed("first-order", "1 gradient", lambda: ranking(jaxpatch.attribute(
        pair, METRIC, granularity=granularity, execution=QUIET), "size"))
    first_order = rankings["first-order"]
    timed("learned patch (gates)", "200 steps", lambda: ranking(dict(zip(names, jaxpatch.learn_patch(
        pair, METRIC, granularity=granularity, sparsity=0.1 / n,
        training=GateTraining(steps=200)).probabilities))))
    searched = names if granularity != "neuron" else first_order[:NARROWED]
    m = len(searched)
    runs = m * (m + 1) // 2 - 1

    def selected(method) -> list[str]:
        order = method(pair, METRIC, granularity=granularity, selector=searched,
                       execution=QUIET).order
        return order + [x for x in first_order if x not in set(order)]

    what = "" if m == n else f" over first-order's top {m}"
    timed(f"greedy forward (exact{what})", f"{runs} runs + 1 gradient" if m < n else f"{runs} runs",
          lambda: selected(greedy_forward))
    timed(f"backward elimination (exact{what})",
          f"{runs} runs + 1 gradient" if m < n else f"{runs} runs",
          lambda: selected(backward_elimination))
    timed("|dW|", "-", lambda: ranking(dict(zip(names, jaxpatch.delta_norms(
        config, planted.base.params, planted.donor.params, items))), "size"))
    rng = np.random.default_rng(0)
    table = _curves(pair, rankings, granularity, ("denoise",),
                    [list(rng.permutation(names)) for _ in range(n_random)])
    return {"granularity": granularity, "n": n, "curves": table, "costs": costs}


def _lines(label: str, table: dict, costs: dict, directions: tuple[str, ...]) -> list[str]:
    header = "| ranking | cost | " + " | ".join(f"CPR {d} | CMD {d}" for d in directions) + " |"
    lines = [label, "", header, "| --- | --- |" + " --- | --- |" * len(directions)]
    for name in table[directions[0]]:
        cells = []
        for d in directions:
            row = table[d][name]
            spread = (f" ({row['cpr_range'][0]:.3f}-{row['cpr_range'][1]:.3f})"
                      if "cpr_range" in row else "")
            cells.append(f"{row['cpr']:.3f}{spread} | {row['cmd']:.3f}")
        shown = name.replace("|", "\\|")  # a pipe inside a markdown table cell
        lines.append(f"| {shown} | {costs.get(name, 'shuffles')} | " + " | ".join(cells) + " |")
    return lines


def summary(seeds: dict[int, dict[str, Any]]) -> list[str]:
    """Mean denoise CPR per method over seeds (min-max), and the set-level target per seed."""
    methods = list(next(iter(seeds.values()))["curves"]["denoise"])
    lines = [f"Over {len(seeds)} seeds (module granularity, denoise; mean, min-max):", "",
             "| ranking | CPR | CMD |", "| --- | --- | --- |"]
    for m in methods:
        cprs = [r["curves"]["denoise"][m]["cpr"] for r in seeds.values()]
        cmds = [r["curves"]["denoise"][m]["cmd"] for r in seeds.values()]
        shown = m.replace("|", "\\|")
        lines.append(f"| {shown} | {np.mean(cprs):.3f} ({min(cprs):.3f}-{max(cprs):.3f}) | "
                     f"{np.mean(cmds):.3f} |")
    lines += ["", "| seed | best set-level method | its CPR | S's CPR | within 0.1 of S | "
              "hierarchy sources: size, f, in S |", "| --- | --- | --- | --- | --- | --- |"]
    for seed, r in seeds.items():
        b, h = r["best_set_level"], r["hierarchy_sources"]
        lines.append(f"| {seed} | {b['method']} | {b['cpr']:.3f} | {b['s_cpr']:.3f} | "
                     f"{'yes' if b['within_0.1_of_S'] else 'no'} | {h['size']}, "
                     f"{h['faithfulness']:.3f}, {h['in_S']} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="planted seeds (0: shipped)")
    parser.add_argument("--pairs", type=Path, help="folder the other seeds' pairs are built into")
    parser.add_argument("--finer", action="store_true",
                        help="also head and neuron granularity on the shipped pair")
    parser.add_argument("--out", help="folder for faithfulness.json (every curve)")
    parser.add_argument("--random", type=int, default=10, help="random rankings in the band")
    args = parser.parse_args()
    seeds: dict[int, dict[str, Any]] = {}
    lines: list[str] = []
    for seed in args.seeds:
        planted = planted_pair(seed, args.pairs)
        seeds[seed] = module_table(planted, args.random)
        r = seeds[seed]
        lines += _lines(f"seed {seed}: {planted.task} task, {r['n']} modules, |S| = {r['planted']}",
                        r["curves"], r["costs"], ("denoise", "noise")) + [""]
        print("\n".join(lines[-len(r["curves"]["denoise"]) - 5:]), flush=True)
    lines += summary(seeds)
    finer = {}
    if args.finer:
        shipped = load_planted(default_pair_dir())
        for g in ("head", "neuron"):
            finer[g] = finer_table(shipped, g, args.random)
            lines += ["", *_lines(f"shipped pair, {g} granularity ({finer[g]['n']} components), "
                                  "denoise:", finer[g]["curves"], finer[g]["costs"], ("denoise",))]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        (out / "faithfulness.json").write_text(json.dumps(
            {"metric": METRIC.name, "seeds": {str(k): v for k, v in seeds.items()},
             "finer": finer}, indent=1, default=lambda x: x.item()) + "\n")  # numpy scalars
        (out / "faithfulness_tables.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
