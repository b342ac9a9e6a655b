"""The commands that score components of a base/donor pair: sweep, attribute, localize, learn,
trace."""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from jaxpatch.cli.common import (
    Command,
    add_attribution_arguments,
    add_patch_at_argument,
    add_run_arguments,
    attribution_options,
    execution_of,
    prepare_run,
    result_files,
    run_log,
    write_outputs,
)
from jaxpatch.errors import InvalidInputError

__all__ = ["register", "thresholds_of"]


def register(command: Command) -> None:
    """Adds this group's commands to the parser."""
    p = command("sweep", _sweep, "score every component by exact weight patching")
    add_run_arguments(p)
    add_patch_at_argument(p)
    p.add_argument("--chunk-size", type=int, help="candidates per batch (default: from free memory)")

    p = command("attribute", _attribute, "score every component by gradient attribution")
    add_run_arguments(p)
    add_attribution_arguments(p)

    p = command("localize", _localize, "rank by attribution, then verify the top k exactly")
    add_run_arguments(p)
    add_attribution_arguments(p)
    p.add_argument("--top-k", type=int, default=20, help="components to verify exactly (default 20)")
    p.add_argument("--controls", type=int, default=20,
                   help="random other components to verify as a control (default 20)")
    p.add_argument("--exhaustive", action="store_true",
                   help="also patch every component exactly, to report recall (small models)")
    p.add_argument("--recall-k", type=int,
                   help="with --exhaustive: recall of the exact top this many (default: --top-k)")
    p.add_argument("--seed", type=int, default=0, help="seed of the control sample")
    p.set_defaults(granularity="neuron")

    p = command("learn", _learn, "learn the smallest patch that recovers (or destroys) the behavior: "
                "one gate per component, trained under a sparsity penalty")
    add_run_arguments(p)
    p.add_argument("--sparsity", type=float, action="append",
                   help="penalty per component in units of effect (repeatable: one patch each, the "
                   "effect-against-size front; default 0.01)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per patch (default 200)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the gates (default 0.1)")

    p = command("trace", _trace, "sort components into sources, aggregation, execution and inert "
                "by supplier -> target tracing (weight and activation patching)")
    add_run_arguments(p, direction=False)
    p.add_argument("--target", action="append", metavar="COMPONENT",
                   help="trace this component's output at the first level (repeatable; default: "
                   "the components with high activation-patching scores, and the sources)")
    p.add_argument("--depth", type=int, default=2, help="expansion levels of tracing (default 2)")
    p.add_argument("--top-targets", type=int, default=24,
                   help="at most this many targets per level (default 24)")
    p.add_argument("--max-groups", type=int, default=12,
                   help="at most this many attention/MLP groups in the source search (default 12)")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE", default=[],
                   help="change a role threshold: candidate, min_gain, activation, supplied, "
                   "execution, edge (repeatable; see jaxpatch.hierarchy.Thresholds)")
    p.set_defaults(metric="logprob")


def _sweep(args: argparse.Namespace) -> None:
    from jaxpatch.engine import sweep
    from jaxpatch.figures import summary_table

    pair, metric, inputs = prepare_run(args)
    with run_log(args, inputs) as log:
        result = sweep(pair, metric, granularity=args.granularity, selector=args.select,
                       direction=args.direction, execution=execution_of(args, log, "sweep"))
        print(summary_table(result))
        t = result.timing
        after = (f", {len(result.skipped)} after the readout layer unchanged without running"
                 if result.skipped else "")
        print(f"{len(result.names)} candidates{after} in {t['wall_s']:.1f} s (compile "
              f"{t['compile_s']:.1f} s, {t['candidates_per_s']:.1f} candidates/s"
              + (f"; {int(t['resumed_candidates'])} read from the progress log)"
                 if "resumed_candidates" in t else ")"))
        if args.out:
            write_outputs(args.out, result_files(result))


def _attribute(args: argparse.Namespace) -> None:
    from jaxpatch.attribution import attribute
    from jaxpatch.figures import summary_table

    pair, metric, inputs = prepare_run(args)
    with run_log(args, inputs) as log:
        result = attribute(pair, metric, **attribution_options(args),
                           execution=execution_of(args, log, "attribute"))
        print(summary_table(result))
        if "completeness" in result.extra:
            c = result.extra["completeness"]
            print(f"completeness: attributions sum to {c['sum_of_attributions']:.6g}, the score "
                  f"difference is {c['score_difference']:.6g} (relative gap "
                  f"{c['relative_gap']:.2e})")
            if c["relative_gap"] > 0.05:
                print(f"  the gap is the midpoint rule's error over {args.steps} path points: "
                      "try --steps 64 or 128 (the error shrinks with more points, but not "
                      "always monotonically; see docs/attribution.md)")
        if args.out:
            write_outputs(args.out, result_files(result))


def _localize(args: argparse.Namespace) -> None:
    from jaxpatch.figures import heatmap_png
    from jaxpatch.localization import Verification, localize

    pair, metric, inputs = prepare_run(args)
    verify = Verification(top_k=args.top_k, controls=args.controls, exhaustive=args.exhaustive,
                          recall_k=args.recall_k, seed=args.seed)
    with run_log(args, inputs) as log:
        report = localize(pair, metric, **attribution_options(args), verify=verify,
                          execution=execution_of(args, log, "localize"))
        if args.out:
            write_outputs(args.out, {
                "attribution.csv": report.attribution.to_csv(), "exact.csv": report.exact.to_csv(),
                "heatmap.png": heatmap_png(report.attribution),
                "localize.json": json.dumps(report.to_dict(), indent=1) + "\n"})
    print(f"verified {len(report.shortlist)} top components and {len(report.controls)} controls "
          f"exactly; Spearman correlation of attribution and exact effects: {report.spearman:.3f}")
    if report.recall is not None:
        print(f"recall of the exact top {args.recall_k or len(report.shortlist)}: {report.recall:.2f}")
    for name, a, e in report.misranked:
        print(f"  misranked: {name} (attribution rank {a}, exact rank {e})")


def _learn(args: argparse.Namespace) -> None:
    from jaxpatch.figures import pareto_png
    from jaxpatch.learned import GateTraining, learn_patch

    pair, metric, inputs = prepare_run(args)
    sparsities = args.sparsity or [0.01]
    for sparsity in sparsities:
        if sparsity < 0:
            raise InvalidInputError(f"--sparsity must be at least 0, got {sparsity}")
    runs = []
    with run_log(args, inputs) as log:
        for sparsity in sparsities:
            learned = learn_patch(pair, metric, granularity=args.granularity, selector=args.select,
                                  direction=args.direction, sparsity=sparsity,
                                  training=GateTraining(steps=args.steps, learning_rate=args.lr),
                                  execution=execution_of(args, log, f"learn {sparsity!r}"))
            runs.append(learned)
            print(f"sparsity {sparsity:g}: {len(learned.selected)} of {len(learned.names)} "
                  f"components, effect {learned.effect:.3f}: "
                  f"{', '.join(learned.selected) or '(none)'}")
        if args.out:
            points = [(len(r.selected), r.effect) for r in runs]
            write_outputs(args.out, {
                "pareto.csv": "sparsity,size,effect\n" + "".join(
                    f"{r.sparsity},{len(r.selected)},{r.effect}\n" for r in runs),
                "pareto.png": pareto_png(points, f"learned {args.direction} patches, "
                                                 f"{args.granularity} granularity"),
                "learned.json": json.dumps({"inputs": inputs, "metric": metric.name,
                                            "patches": [r.to_dict() for r in runs]},
                                           indent=1) + "\n"})


def thresholds_of(pairs: Sequence[str]) -> Any:
    """`Thresholds` from `NAME=VALUE` strings (one line naming the bad one otherwise)."""
    import dataclasses

    from jaxpatch.hierarchy import Thresholds

    known = {f.name for f in dataclasses.fields(Thresholds)}
    values: dict[str, float] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name.strip() not in known:
            raise InvalidInputError(f"--threshold {pair!r}: unknown threshold (choose from "
                                    f"{', '.join(sorted(known))})")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise InvalidInputError(f"--threshold {pair!r}: {value!r} is not a number") from None
    return Thresholds(**values)


def _trace(args: argparse.Namespace) -> None:
    from jaxpatch.figures import hierarchy_png
    from jaxpatch.hierarchy import TraceSearch, trace_hierarchy

    if args.granularity == "layer":
        raise InvalidInputError("trace sorts modules, heads or neurons: choose --granularity "
                                "module, head or neuron")
    thresholds = thresholds_of(args.threshold)
    pair, metric, inputs = prepare_run(args)
    formed = args.anchor_layer if args.metric != "anchor" else None
    search = TraceSearch(targets=tuple(args.target) if args.target else None, depth=args.depth,
                         top_targets=args.top_targets, max_groups=args.max_groups)
    with run_log(args, inputs) as log:
        traced = trace_hierarchy(pair, metric, granularity=args.granularity, selector=args.select,
                                 formation_layer=formed, thresholds=thresholds, search=search,
                                 execution=execution_of(args, log, "trace"))
        if args.out:
            graph = {**traced.graph(), "inputs": inputs}
            write_outputs(args.out, {"hierarchy.csv": traced.to_csv(),
                                     "hierarchy.png": hierarchy_png(graph),
                                     "graph.json": json.dumps(graph, indent=1) + "\n"})
    for role in ("source", "aggregation", "execution"):
        names = traced.with_role(role)
        print(f"{role} ({len(names)}): {', '.join(names) or '-'}")
    print(f"validated sources recover {traced.sources_recovery:.3f} together; {len(traced.edges)} "
          f"edges; {traced.calls['candidate_runs']} candidate runs in "
          f"{traced.timing['wall_s']:.1f} s")
