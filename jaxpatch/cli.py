"""The `jaxpatch` command.

Every subcommand turns a `JaxpatchError` into one line on stderr and exit status 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from jaxpatch.errors import InvalidInputError, JaxpatchError
from jaxpatch.mesh import is_writer
from jaxpatch.modes import Positions
from jaxpatch.runs.atomic import atomic_directory, atomic_write_bytes
from jaxpatch.runs.log import RunLog, writing

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `jaxpatch` command line.

    Arguments:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status (0 on success, 2 on bad input).

    Example:
        >>> main(["info", str(fixtures / "gpt2")])  # doctest: +ELLIPSIS
        /.../gpt2: gpt2, 29,568 params (float32)
          layers 2, d_model 32, heads 4 x 8, kv heads 4 [MHA], d_ff 128, vocab 96, context 32
          tokenizer: yes
        0
        >>> main(["info", str(tmp / "missing")])  # one line on stderr, status 2
        2
    """
    from jaxpatch import compile_cache

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.no_compile_cache:
        compile_cache.disable()
    elif args.compile_cache:
        compile_cache.enable(args.compile_cache)
    else:  # on by default for the command (not for the library: see jaxpatch.compile_cache)
        compile_cache.from_environment()
    try:
        if args.distributed:
            from jaxpatch.mesh import initialize_distributed

            initialize_distributed()
        args.run(args)
    except JaxpatchError as e:
        if args.debug:
            traceback.print_exc()
        print(f"jaxpatch: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def one_line(message: str) -> str:
    """Collapses a message onto one line.

    Example:
        >>> one_line("a\\n  b")
        'a b'
    """
    return " ".join(message.split())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `jaxpatch` command.

    Example:
        >>> build_parser().parse_args(["info", "x"]).checkpoint
        'x'
    """
    parser = argparse.ArgumentParser(
        prog="jaxpatch",
        description="Weight patching in JAX: find which parameters are the source of a capability.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR",
                       help="JAX's persistent compilation cache folder (default: "
                       "$JAXPATCH_COMPILE_CACHE, else ~/.cache/jaxpatch/xla)")
    cache.add_argument("--no-compile-cache", action="store_true",
                       help="do not read or write compiled programs")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run first (jax.distributed: "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or SLURM, "
                        "Open MPI, Cloud TPU); every process runs the same command, the first "
                        "writes the results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        p.set_defaults(run=run)
        return p

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

    p = command("info", _info, "print a checkpoint's architecture and parameter count")
    p.add_argument("checkpoint", help="Hugging Face or jaxpatch Orbax checkpoint folder, or a .gguf file")

    p = command("forward", _forward, "run a forward pass and print the top next-token predictions")
    p.add_argument("checkpoint", help="Hugging Face or jaxpatch Orbax checkpoint folder, or a .gguf file")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="text to tokenize with the checkpoint's tokenizer.json")
    group.add_argument("--tokens", help="comma-separated token ids")
    p.add_argument("--top", type=int, default=5, help="how many predictions to print (default 5)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params")

    p = command("sweep", _sweep, "score every component by exact weight patching")
    add_run_arguments(p)
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

    p = command("merge", _merge, "merge models as a mergekit YAML file says (linear, "
                "task_arithmetic, ties, dare_linear, dare_ties, slerp) into a Hugging Face folder")
    p.add_argument("config", help="mergekit YAML: merge_method, base_model, models, parameters, dtype")
    p.add_argument("out", help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of random sparsification (DARE)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = command("merge-eval", _merge_eval, "merge a planted pair's experts with every method "
                "(data-free, score-guided, localize-and-stitch) and measure each task's accuracy")
    p.add_argument("pair", help="a planted pair folder with experts (experiments/pairs/default)")
    p.add_argument("--out", required=True, help="folder for merge_eval.json and merge_eval.md "
                   "(progress recorded there; the same command resumes it)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="score-guided merges: the effect a carrying module reaches (default 0.1)")
    p.add_argument("--eval-prompts", type=int, default=128,
                   help="accuracy prompts per task (default 128)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an existing --out folder")

    p = command("convert", _convert, "write a checkpoint in another format or dtype")
    p.add_argument("source", help="checkpoint folder or .gguf file to read (never modified)")
    p.add_argument("destination", help="folder to create")
    p.add_argument("--format", choices=["hf", "orbax"], default="hf")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def add_run_arguments(p: argparse.ArgumentParser, direction: bool = True) -> None:
    """The flags shared by commands that score components of a base/donor pair."""
    p.add_argument("--base", required=True, help="base checkpoint folder")
    p.add_argument("--donor", required=True, help="donor (behavior-specialized) checkpoint folder")
    p.add_argument("--prompts", required=True, help='JSON Lines: {"text": ...} or {"tokens": [...]}')
    p.add_argument("--granularity", choices=["module", "head", "neuron", "layer"], default="module")
    p.add_argument("--select", help="selector restricting the components, e.g. 'layers.2-3.mlp'")
    p.add_argument("--metric", choices=["anchor", "logit-diff", "kl", "logprob"], default="anchor")
    p.add_argument("--anchor-layer", type=int, help="block whose output the anchor reads "
                   "(default: the last block)")
    p.add_argument("--anchor-file", help="load the anchor direction from this file")
    p.add_argument("--save-anchor", help="write the fitted anchor direction to this file")
    p.add_argument("--positions", choices=["last", "prompt", "continuation"], default="last")
    p.add_argument("--continuation-tokens", type=int, default=8,
                   help="tokens the donor generates for --positions continuation (default 8)")
    if direction:
        p.add_argument("--direction", choices=["denoise", "noise"], default="denoise")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params")
    p.add_argument("--out", help="folder for the results; progress is recorded there as the run "
                   "goes, and the same command started again resumes it")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an existing --out folder (its recorded progress is "
                        "discarded, its results replaced)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="split the work over devices: candidates=N (a chunk's candidates; "
                   "gradients: prompts), model=N (heads and neurons; the checkpoints are read "
                   "shard by shard), data=N (prompts), e.g. candidates=4,model=2 (default: "
                   "every device on candidates)")


def add_attribution_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the attribution commands."""
    p.add_argument("--method", choices=["first-order", "integrated-gradients"], default="first-order")
    p.add_argument("--steps", type=int, default=16, help="integrated-gradients steps (default 16)")
    p.add_argument("--step-batch", type=int, default=1,
                   help="integrated-gradients steps run at once (default 1; memory grows with it)")
    p.add_argument("--prompt-batch", type=int, help="accumulate gradients over this many prompts at a time")
    p.add_argument("--remat", action="store_true", help="recompute activations in the backward pass")


def attribution_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments `attribute` and `localize` take from the attribution flags."""
    return {"granularity": args.granularity, "selector": args.select, "method": args.method,
            "direction": args.direction, "steps": args.steps}


def execution_of(args: argparse.Namespace, log: Any = None, task: str = "") -> Any:
    """The `Execution` the run flags describe, recording into `log`'s task `task` (if any)."""
    from jaxpatch.runs.settings import Execution

    return Execution(chunk_size=getattr(args, "chunk_size", None),
                     prompt_batch=getattr(args, "prompt_batch", None),
                     step_batch=getattr(args, "step_batch", 1) or 1,
                     remat=bool(getattr(args, "remat", False)),
                     progress=False if args.no_progress else None,
                     log=log.task(task) if log is not None else None)


def positions_of(args: argparse.Namespace) -> Positions:
    """Where the metric reads: `--positions`, except that log-probability reads the positions
    predicting each prompt's target tokens ("targets")."""
    return "targets" if args.metric == "logprob" else args.positions


def prepare_run(args: argparse.Namespace,
                resumable: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Loads the pair, reads the prompts, builds the batch and the metric from the run flags.

    Arguments:
        args: the parsed flags (`add_run_arguments`).
        resumable: the command records its progress in `--out` (an existing folder with a
            progress log is then accepted, to resume).

    Returns:
        `(pair, metric, inputs)`: the prepared pair (`jaxpatch.prepare`), the metric fitted to
        it, and the inputs' fingerprints.
    """
    import jaxpatch
    from jaxpatch.io.fingerprint import checkpoint_fingerprint, file_sha256, versions
    from jaxpatch.mesh import default_mesh, make_mesh
    from jaxpatch.metrics import metric_from_name
    from jaxpatch.prompts import greedy_continuations, make_batch, read_prompts

    if args.out and resumable and is_writer():  # refuse an unusable folder before any work
        RunLog.check_folder(args.out, args.overwrite)
    elif args.out and is_writer():
        check_output(args.out, args.overwrite)
    mesh = make_mesh(args.mesh) if args.mesh else default_mesh()
    # the default recorded as what it is (part of a run's identity)
    args.mesh = None if mesh is None else ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    base = jaxpatch.load(args.base, dtype=args.dtype, mesh=mesh)
    donor = jaxpatch.load(args.donor, dtype=args.dtype, mesh=mesh)
    jaxpatch.check_pair(base, donor)  # before the prompts are read and continuations generated
    prompts = read_prompts(args.prompts, base.tokenizer)
    layer = args.anchor_layer if args.anchor_layer is not None else base.config.n_layers - 1
    metric = metric_from_name(args.metric, layer, args.anchor_file)
    metric.check(base.config)
    continuations = None
    if positions_of(args) == "continuation":
        continuations = greedy_continuations(donor.config, donor.params, prompts,
                                             args.continuation_tokens)
    batch = make_batch(base.config, prompts, positions_of(args), continuations)
    inputs = {"base": {"path": args.base, "sha256": checkpoint_fingerprint(base)},
              "donor": {"path": args.donor, "sha256": checkpoint_fingerprint(donor)},
              "prompts": {"path": args.prompts, "sha256": file_sha256(args.prompts),
                          "count": len(prompts)},
              "anchor_file": None if not args.anchor_file else {
                  "path": args.anchor_file, "sha256": file_sha256(args.anchor_file)},
              "granularity": args.granularity, "select": args.select,
              "continuations": continuations, "versions": versions()}
    pair = jaxpatch.prepare(base, donor, batch, mesh=mesh, positions=positions_of(args),
                            inputs=inputs)
    if args.save_anchor and args.metric == "anchor":
        from jaxpatch.metrics import save_anchor

        save_anchor(args.save_anchor, pair.endpoints(metric).state, layer)  # prepared once
    return pair, metric, inputs


# Flags that change no number of a run: a resumed run may differ in them.
_NOT_SETTINGS = frozenset({"run", "debug", "out", "overwrite", "no_progress", "compile_cache",
                           "no_compile_cache", "base", "donor", "prompts", "anchor_file",
                           "save_anchor", "pair"})


def run_settings(args: argparse.Namespace, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a run for resuming: the command, every flag that changes a number,
    the inputs' fingerprints (not their paths) and the versions and device kind.

    Example:
        >>> args = build_parser().parse_args(["merge-eval", "pair", "--out", "o"])
        >>> run_settings(args, {"pair": {"sha256": "ab"}})["arguments"]["threshold"]
        0.1
    """
    from jaxpatch.io.fingerprint import versions

    arguments = {k: v for k, v in sorted(vars(args).items())
                 if k not in _NOT_SETTINGS and not callable(v)}
    fingerprints = {name: value["sha256"] for name, value in inputs.items()
                    if isinstance(value, Mapping) and "sha256" in value}
    return {"command": args.command, "arguments": arguments, "inputs": fingerprints,
            "versions": versions()}


@contextlib.contextmanager
def run_log(args: argparse.Namespace, inputs: Mapping[str, Any]) -> Iterator[RunLog | None]:
    """The progress log of a run with `--out` (None without), held for the block.

    Example:
        >>> args = build_parser().parse_args(["merge-eval", "pair", "--out", str(tmp / "r")])
        >>> with run_log(args, {}) as log:
        ...     log.path.name
        'progress.jsonl'
    """
    if not args.out:
        yield None
        return
    if jax.process_count() > 1:  # the first process records; the others replay with it
        with _first_process_log(args, inputs) as log:
            yield log
        return
    with RunLog.open(args.out, run_settings(args, inputs), overwrite=args.overwrite) as log:
        if log.resumed:
            print(f"resuming the run in {args.out}: {log.resumed} finished pieces recorded",
                  file=sys.stderr)
        yield log


@contextlib.contextmanager
def _first_process_log(args: argparse.Namespace,
                       inputs: Mapping[str, Any]) -> Iterator[RunLog | None]:
    """A multi-process run's log: the first process opens (and writes) it; the others replay
    its records from a copy sent to them and write nothing, so every process runs and skips
    the same chunks."""
    from jaxpatch.mesh import broadcast_json

    with contextlib.ExitStack() as stack:
        log = (stack.enter_context(RunLog.open(args.out, run_settings(args, inputs),
                                               overwrite=args.overwrite))
               if is_writer() else None)
        records = broadcast_json(None if log is None else log.records)
        if log is None:
            log = RunLog.mirror(args.out, records)
        elif log.resumed:
            print(f"resuming the run in {args.out}: {log.resumed} finished pieces recorded",
                  file=sys.stderr)
        yield log


def write_outputs(out: str, files: Mapping[str, bytes | str]) -> None:
    """Writes each output file atomically into `out`, in order (the main JSON goes last, so
    that its presence means the run finished), and says so.

    Example:
        >>> write_outputs(str(tmp), {"a.csv": "x,y", "a.json": "{}"})
        wrote .../a.csv, a.json
    """
    if not is_writer():  # the first process of a multi-process run writes
        return
    for name, data in files.items():
        with writing(Path(out) / name):
            atomic_write_bytes(Path(out) / name, data.encode() if isinstance(data, str) else data)
    print(f"wrote {out}/{', '.join(files)}")


def result_files(result: Any) -> dict[str, bytes | str]:
    """A score table's output files: scores.csv, heatmap.png, then scores.json.

    Example:
        >>> from jaxpatch.results import SweepResult
        >>> list(result_files(SweepResult("kl", "denoise", None, "last", 1.0, 0.0,
        ...                               ["layers.0.mlp"], np.array([0.5]))))
        ['scores.csv', 'heatmap.png', 'scores.json']
    """
    from jaxpatch.report import heatmap_png

    return {"scores.csv": result.to_csv(), "heatmap.png": heatmap_png(result),
            "scores.json": json.dumps(result.to_dict(), indent=1) + "\n"}


def _sweep(args: argparse.Namespace) -> None:
    from jaxpatch.engine import sweep
    from jaxpatch.report import summary_table

    pair, metric, inputs = prepare_run(args)
    with run_log(args, inputs) as log:
        result = sweep(pair, metric, granularity=args.granularity, selector=args.select,
                       direction=args.direction, execution=execution_of(args, log, "sweep"))
        print(summary_table(result))
        t = result.timing
        print(f"{len(result.names)} candidates in {t['wall_s']:.1f} s (compile "
              f"{t['compile_s']:.1f} s, {t['candidates_per_s']:.1f} candidates/s"
              + (f"; {int(t['resumed_candidates'])} read from the progress log)"
                 if "resumed_candidates" in t else ")"))
        if args.out:
            write_outputs(args.out, result_files(result))


def _attribute(args: argparse.Namespace) -> None:
    from jaxpatch.attribution import attribute
    from jaxpatch.report import summary_table

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
        if args.out:
            write_outputs(args.out, result_files(result))


def _localize(args: argparse.Namespace) -> None:
    from jaxpatch.attribution import Verification, localize
    from jaxpatch.report import heatmap_png

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
    from jaxpatch.learned import GateTraining, learn_patch
    from jaxpatch.report import pareto_png

    pair, metric, inputs = prepare_run(args)
    runs = []
    for sparsity in args.sparsity or [0.01]:
        if sparsity < 0:
            raise InvalidInputError(f"--sparsity must be at least 0, got {sparsity}")
        learned = learn_patch(pair, metric, granularity=args.granularity, selector=args.select,
                              direction=args.direction, sparsity=sparsity,
                              training=GateTraining(steps=args.steps, learning_rate=args.lr))
        runs.append(learned)
        print(f"sparsity {sparsity:g}: {len(learned.selected)} of {len(learned.names)} components, "
              f"effect {learned.effect:.3f}: {', '.join(learned.selected) or '(none)'}")
    if args.out:
        points = [(len(r.selected), r.effect) for r in runs]
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
            (tmp / "learned.json").write_text(json.dumps(
                {"inputs": inputs, "metric": metric.name, "patches": [r.to_dict() for r in runs]},
                indent=1) + "\n")
            (tmp / "pareto.csv").write_text("sparsity,size,effect\n" + "".join(
                f"{r.sparsity},{len(r.selected)},{r.effect}\n" for r in runs))
            (tmp / "pareto.png").write_bytes(pareto_png(points, f"learned {args.direction} patches, "
                                                                f"{args.granularity} granularity"))
        print(f"wrote {args.out}/learned.json, pareto.csv, pareto.png")


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
    from jaxpatch.hierarchy import TraceSearch, trace_hierarchy
    from jaxpatch.report import hierarchy_png

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


def _merge(args: argparse.Namespace) -> None:
    import jaxpatch
    from jaxpatch.merge import merge_models, read_config

    check_output(args.out, args.overwrite)
    config = read_config(args.config)
    merged = merge_models(config, seed=args.seed, progress=not args.no_progress)
    jaxpatch.save(merged, args.out, overwrite=args.overwrite)
    print(f"merged {len(config.models)} model(s) into {config.base.name if config.base else 'none'}"
          f" with {config.method}: wrote {args.out}")


def _merge_eval(args: argparse.Namespace) -> None:
    from jaxpatch.io.fingerprint import folder_sha256
    from jaxpatch.merge_eval import merge_eval, table

    RunLog.check_folder(args.out, args.overwrite)
    if args.eval_prompts < 1:
        raise InvalidInputError(f"--eval-prompts must be at least 1, got {args.eval_prompts}")
    if not Path(args.pair).is_dir():
        raise InvalidInputError(f"{args.pair}: planted pair folder not found")
    with run_log(args, {"pair": {"sha256": folder_sha256(args.pair)}}) as log:
        document = merge_eval(args.pair, threshold=args.threshold, eval_prompts=args.eval_prompts,
                              progress=lambda combo: print(f"merged {combo}", flush=True),
                              log=log.task("merge-eval") if log else None)
        markdown = table(document)
        print(markdown)
        write_outputs(args.out, {"merge_eval.md": markdown + "\n",
                                 "merge_eval.json": json.dumps(document, indent=1) + "\n"})


def _demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tqdm.auto import tqdm

    from jaxpatch.evaluate import default_pair_dir, evaluate, load_planted, stage_count
    from jaxpatch.modes import SCORED_GRANULARITIES
    from jaxpatch.report import summary_lines, write_run

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

    from jaxpatch.report import read_run, render_html
    from jaxpatch.runs.atomic import atomic_write_bytes

    summary, results = read_run(args.run_dir)
    target = Path(args.run_dir) / "report.html"
    atomic_write_bytes(target, render_html(summary, results).encode())
    print(f"wrote {target}")


def check_output(out: str, overwrite: bool) -> None:
    """Refuses an existing, non-empty output folder unless overwriting."""
    from pathlib import Path

    from jaxpatch.errors import OutputExistsError

    path = Path(out)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise OutputExistsError(f"{path}: already exists; choose another --out or pass --overwrite")


def _info(args: argparse.Namespace) -> None:
    import jaxpatch

    model = jaxpatch.load(args.checkpoint)
    c = model.config
    attention = ("MHA" if c.n_kv_heads == c.n_heads else "MQA" if c.n_kv_heads == 1
                 else f"GQA ({c.queries_per_kv_head} query heads per kv head)")
    print(f"{args.checkpoint}: {c.family}, {jaxpatch.count_params(model.params):,} params ({c.dtype})")
    print(f"  layers {c.n_layers}, d_model {c.d_model}, heads {c.n_heads} x {c.head_dim}, "
          f"kv heads {c.n_kv_heads} [{attention}], d_ff {c.d_ff}, vocab {c.vocab_size}, "
          f"context {c.max_position_embeddings}")
    print(f"  tokenizer: {'yes' if model.tokenizer is not None else 'none'}")


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

    model = jaxpatch.load(args.source, dtype=args.dtype)
    jaxpatch.save(model, args.destination, format=args.format, overwrite=args.overwrite)
    print(f"wrote {args.destination} ({args.format}, {model.config.dtype})")


if __name__ == "__main__":
    sys.exit(main())
