"""What the scoring commands share: their flags, the prepared run (pair, metric, fingerprints),
the execution settings and the progress log their flags describe, and atomic output files."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax

from jaxpatch.errors import InvalidInputError, OutputExistsError
from jaxpatch.mesh import is_writer
from jaxpatch.modes import Positions
from jaxpatch.runs.atomic import atomic_write_bytes
from jaxpatch.runs.log import RunLog, writing
from jaxpatch.runs.settings import Execution

__all__ = ["Command", "add_run_arguments", "run_chat_template", "model_record",
           "add_attribution_arguments", "attribution_options", "execution_of", "positions_of",
           "resolve_metric", "prepare_run", "add_patch_at_argument", "run_settings", "run_log",
           "write_outputs", "result_files", "check_output"]

Command = Callable[..., argparse.ArgumentParser]
"""`command(name, run, help)`: a new subcommand's parser, running `run(args)`."""


def add_run_arguments(p: argparse.ArgumentParser, direction: bool = True) -> None:
    """The flags shared by commands that score components of a base/donor pair."""
    p.add_argument("--base", required=True,
                   help="base model: a checkpoint folder, a GGUF file or a Hugging Face hub name "
                        "(NAME or NAME@REVISION, read from the Hugging Face cache)")
    p.add_argument("--donor", required=True,
                   help="donor (behavior-specialized) model: folder, GGUF file or hub name")
    p.add_argument("--prompts", required=True,
                   help='JSON Lines: {"text": ...}, {"tokens": [...]}, chat {"messages": [...]} or '
                        '{"instruction": ...}')
    p.add_argument("--chat-template", default="donor", metavar="donor|base|FILE",
                   help="the chat template rendering messages and instructions: the donor's, the "
                        "base's, or a .jinja / tokenizer_config.json file (default donor)")
    p.add_argument("--granularity", choices=["module", "head", "neuron", "layer"], default="module",
                   help="what a component is (default module)")
    p.add_argument("--select", help="selector restricting the components, e.g. 'layers.2-3.mlp'")
    p.add_argument("--metric", choices=["anchor", "logit-diff", "kl", "logprob"],
                   help="the behavior read (default: logprob, the log-probability of the answers, "
                   "when every prompt carries a target; else anchor, the vector anchor)")
    p.add_argument("--anchor-layer", type=int, help="block whose output the anchor reads "
                   "(default: the last block)")
    p.add_argument("--anchor-file", help="load the anchor direction from this file")
    p.add_argument("--save-anchor", help="write the fitted anchor direction to this file")
    p.add_argument("--positions", choices=["last", "prompt", "continuation"],
                   help="where anchor, kl and logit-diff read: the last prompt token, every "
                   "prompt token, or a continuation the donor writes (default last; logprob "
                   "reads the positions predicting each target and takes no --positions)")
    p.add_argument("--continuation-tokens", type=int, default=8,
                   help="tokens the donor generates for --positions continuation (default 8)")
    if direction:
        p.add_argument("--direction", choices=["denoise", "noise"], default="denoise",
                       help="denoise: donor weights into the base; noise: base weights into the "
                       "donor (default denoise)")
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


def add_patch_at_argument(p: argparse.ArgumentParser) -> None:
    """`--patch-at`: the token positions weight patches apply at (sweep, faithfulness)."""
    p.add_argument("--patch-at", choices=["everywhere", "prompt", "response", "first-response",
                                          "marked"], default="everywhere",
                   help="apply the donor's (or base's) weights only at some token positions: the "
                   "prompt before its last token, the response (the last prompt token and every "
                   "token after it), the first response token alone, or the tokens each prompt "
                   "line's \"mark\" names (default everywhere)")


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


def execution_of(args: argparse.Namespace, log: RunLog | None = None, task: str = "") -> Execution:
    """The `Execution` the run flags describe, recording into `log`'s task `task` (if any).

    Example:
        >>> args = argparse.Namespace(chunk_size=8, no_progress=True)
        >>> execution_of(args).chunk_size, execution_of(args).progress
        (8, False)
    """
    return Execution(chunk_size=getattr(args, "chunk_size", None),
                     prompt_batch=getattr(args, "prompt_batch", None),
                     step_batch=getattr(args, "step_batch", 1) or 1,
                     remat=bool(getattr(args, "remat", False)),
                     progress=False if args.no_progress else None,
                     log=log.task(task) if log is not None else None)


def positions_of(args: argparse.Namespace) -> Positions:
    """Where the metric reads: `--positions` (default last), except that log-probability reads
    the positions predicting each prompt's target tokens ("targets")."""
    return "targets" if args.metric == "logprob" else (args.positions or "last")


def resolve_metric(args: argparse.Namespace, prompts: Sequence[Any]) -> None:
    """Fills in the default `--metric` (logprob when every prompt carries a target, else
    anchor; anchor when an anchor file is given or saved) and refuses flags the metric cannot
    apply (`--positions` with logprob, `--anchor-file`/`--save-anchor` with another metric).

    Example:
        >>> from jaxpatch.prompts import Prompt
        >>> args = argparse.Namespace(metric=None, positions=None)
        >>> resolve_metric(args, [Prompt((1, 2), target=(3,))]); args.metric
        'logprob'
    """
    anchor_flags = [f for f, v in (("--anchor-file", getattr(args, "anchor_file", None)),
                                   ("--save-anchor", getattr(args, "save_anchor", None))) if v]
    if args.metric is None:
        answered = bool(prompts) and all(p.target for p in prompts)
        args.metric = "logprob" if answered and not anchor_flags else "anchor"
    if anchor_flags and args.metric != "anchor":
        raise InvalidInputError(f"{anchor_flags[0]} applies to --metric anchor only, not "
                                f"--metric {args.metric}")
    if args.metric == "logprob" and args.positions is not None:
        raise InvalidInputError(f"--positions {args.positions} does not apply to --metric "
                                "logprob, which reads the positions predicting each prompt's "
                                "target; leave --positions out")
    if args.positions is None and args.metric != "logprob":
        args.positions = "last"


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
    from jaxpatch.mesh import default_mesh, make_mesh
    from jaxpatch.metrics import metric_from_name
    from jaxpatch.prompts import greedy_continuations, make_batch, read_prompts
    from jaxpatch.runs.fingerprint import file_sha256, versions

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
    jaxpatch.select(base.config, args.select, args.granularity)  # before anything is written
    template = run_chat_template(args.chat_template, base, donor)
    prompts = read_prompts(args.prompts, base.tokenizer, template)
    resolve_metric(args, prompts)
    layer = args.anchor_layer if args.anchor_layer is not None else base.config.n_layers - 1
    metric = metric_from_name(args.metric, layer, args.anchor_file)
    metric.check(base.config)
    continuations = None
    if positions_of(args) == "continuation":
        continuations = greedy_continuations(donor.config, donor.params, prompts,
                                             args.continuation_tokens)
    batch = make_batch(base.config, prompts, positions_of(args), continuations)
    inputs = {"base": model_record(args.base, base), "donor": model_record(args.donor, donor),
              "prompts": {"path": args.prompts, "sha256": file_sha256(args.prompts),
                          "count": len(prompts)},
              "anchor_file": None if not args.anchor_file else {
                  "path": args.anchor_file, "sha256": file_sha256(args.anchor_file)},
              "chat_template": None if template is None else {
                  "from": args.chat_template, "origin": template.origin,
                  "sha256": template.sha256},
              "granularity": args.granularity, "select": args.select,
              "continuations": continuations, "versions": versions()}
    pair = jaxpatch.prepare(base, donor, batch, mesh=mesh, positions=positions_of(args),
                            inputs=inputs, patch_at=getattr(args, "patch_at", "everywhere"))
    if args.save_anchor and args.metric == "anchor":
        from jaxpatch.metrics import save_anchor

        save_anchor(args.save_anchor, pair.endpoints(metric).state, layer)  # prepared once
    return pair, metric, inputs


def run_chat_template(choice: str, base: Any, donor: Any) -> Any:
    """The chat template `--chat-template` names: the donor's or the base's (None when that
    model has none), or one read from a file.

    Example:
        >>> import jaxpatch
        >>> m = jaxpatch.load(fixtures / "gpt2")
        >>> run_chat_template("donor", m, m) is None
        True
    """
    from jaxpatch.chat import chat_template_from_file

    if choice == "donor":
        return donor.chat_template
    if choice == "base":
        return base.chat_template
    return chat_template_from_file(choice)


def model_record(given: str, model: Any) -> dict[str, Any]:
    """What a run records of a model: the path or hub name as given, the hub commit its cached
    snapshot holds (None for a local folder) and the checkpoint's SHA-256.

    Example:
        >>> import jaxpatch
        >>> model_record("m", jaxpatch.load(fixtures / "gpt2"))["revision"] is None
        True
    """
    from jaxpatch.io.hub import hub_revision
    from jaxpatch.runs.fingerprint import checkpoint_fingerprint

    hub = hub_revision(model.source)
    return {"path": given, "revision": None if hub is None else hub[1],
            "sha256": checkpoint_fingerprint(model)}


# Flags that change no number of a run: a resumed run may differ in them.
_NOT_SETTINGS = frozenset({"run", "debug", "out", "overwrite", "no_progress", "compile_cache",
                           "no_compile_cache", "base", "donor", "prompts", "anchor_file",
                           "save_anchor", "pair"})


def run_settings(args: argparse.Namespace, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a run for resuming: the command, every flag that changes a number,
    the inputs' fingerprints (not their paths) and the versions and device kind.

    Example:
        >>> from jaxpatch.cli import build_parser
        >>> args = build_parser().parse_args(["merge-eval", "pair", "--out", "o"])
        >>> run_settings(args, {"pair": {"sha256": "ab"}})["arguments"]["threshold"]
        0.1
    """
    from jaxpatch.runs.fingerprint import versions

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
        >>> from jaxpatch.cli import build_parser
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
        >>> list(result_files(SweepResult(
        ...     metric="kl", direction="denoise", readout_layer=None, positions="last",
        ...     base_score=1.0, donor_score=0.0, names=["layers.0.mlp"], scores=np.array([0.5]))))
        ['scores.csv', 'heatmap.png', 'scores.json']
    """
    from jaxpatch.figures import heatmap_png

    return {"scores.csv": result.to_csv(), "heatmap.png": heatmap_png(result),
            "scores.json": json.dumps(result.to_dict(), indent=1) + "\n"}


def check_output(out: str, overwrite: bool, name: str = "--out") -> None:
    """Refuses an existing, non-empty output folder unless overwriting (`name`: how the
    command line names the folder)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: is a file, not a folder; choose a folder for {name}")
    if path.exists() and not overwrite and any(path.iterdir()):
        raise OutputExistsError(f"{path}: already exists; choose another {name} or pass --overwrite")
