"""The reference experiment: every localization method scored against a planted set.

A planted pair (`python -m experiments.planted`) is a folder with `base/`, `donor/`,
`planted.json` (the planted set S and how the pair was trained) and `prompts/<task>.jsonl`
(patching prompts) and `prompts/<task>-eval.jsonl` (accuracy prompts). `evaluate` runs, at
module, head and neuron granularity:

    exact-denoise, exact-noise     weight patching sweeps (`jaxpatch.engine.sweep`)
    first-order                    attribution at the base (`jaxpatch.attribution`)
    integrated-gradients           attribution along the whole patch path
    learned-patch                  gates learned jointly under a sparsity penalty (`jaxpatch.learned`)
    activation-denoise/-noise      activation patching (`jaxpatch.engine.activation`)
    delta-norm                     |donor - base| over each component's parameters
    random                         a seeded random ranking

and ranks components by the size of their effect (`|effect|`; the norm itself for
delta-norm), scoring each ranking by ROC AUC against S. It also measures the behavior (task
accuracy of base, donor, S-patched base and S-reverted donor), at neuron granularity,
narrow-then-verify (`jaxpatch.localization` with an exhaustive check), and at module
granularity the source-level hierarchy (`jaxpatch.hierarchy`) scored against S: precision and
recall of `source`, how the components outside S that activation patching flags are
classified, and every ranking's faithfulness curve in both directions (`jaxpatch.faithfulness`:
its top k modules patched together), beside S's own curve.

A model with more than `EXHAUSTIVE_NEURONS` neurons (a real model: google/gemma-3-270m has
36,864) is not swept neuron by neuron: at neuron granularity `evaluate` narrows with integrated
gradients and verifies the shortlist exactly, which is what the framework is for, and measures
the recall of S's own exact top neurons (S's neurons patched one at a time, as ground truth for
the evaluation, not part of the method). The methods that need one run per neuron (exact sweeps,
activation patching, the learned patch) are not run there and are reported as not run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxpatch.attribution import attribute
from jaxpatch.components import select
from jaxpatch.engine import PreparedPair, activation_patching, prepare, sweep
from jaxpatch.errors import CheckpointNotFoundError, InvalidInputError
from jaxpatch.faithfulness import faithfulness_curves, ranking
from jaxpatch.hierarchy import Behavior, trace_hierarchy
from jaxpatch.learned import GateTraining, learn_patch
from jaxpatch.localization import Verification, localize
from jaxpatch.metrics import LogProb
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.model import Model
from jaxpatch.modes import PAIR_DIRECTIONS, SCORED_GRANULARITIES, PairDirection, ScoredGranularity
from jaxpatch.pair import delta_norms
from jaxpatch.patch import apply
from jaxpatch.prompts import Prompt, greedy_continuations, make_batch, read_prompts
from jaxpatch.results import SweepResult, misranked_to_dicts
from jaxpatch.runs.settings import Execution
from jaxpatch.stats import roc_auc
from jaxpatch.studies.scoring import plant_patch, planted_labels

__all__ = ["EVALUATED_METHODS", "EXHAUSTIVE_NEURONS", "STAGES", "PlantedPair", "default_pair_dir",
           "load_planted", "task_accuracy", "behavior", "importance", "Evaluation",
           "stage_count", "hierarchy_against_plant", "evaluate"]

EVALUATED_METHODS: tuple[str, ...] = (
    "exact-denoise", "exact-noise", "first-order", "integrated-gradients", "learned-patch",
    "activation-denoise", "activation-noise", "delta-norm", "random")
RESULTS_FORMAT = "jaxpatch.planted-evaluation/1"
EXHAUSTIVE_NEURONS = 8192  # above this many neurons, neuron granularity is narrowed, not swept
STAGES: tuple[str, ...] = ("narrow-then-verify", *EVALUATED_METHODS, "hierarchy", "faithfulness")


@dataclasses.dataclass
class PlantedPair:
    """A planted pair loaded from its folder.

    Attributes:
        folder: where it was read from.
        base, donor: the models.
        plant: the planted set's selector.
        task: the donor's instruction task.
        prompts: the patching prompts (with their answers as targets).
        eval_prompts: the accuracy prompts.
        record: `planted.json`.
    """

    folder: Path
    base: Model
    donor: Model
    plant: str
    task: str
    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    record: dict[str, Any]


def default_pair_dir() -> Path:
    """The folder of the planted pair shipped with jaxpatch (`jaxpatch/studies/pairs/default`).

    Example:
        >>> (default_pair_dir() / "planted.json").is_file()
        True
    """
    return Path(__file__).parent / "pairs" / "default"


def load_planted(folder: str | Path) -> PlantedPair:
    """Loads a planted pair folder.

    Raises:
        CheckpointNotFoundError: the folder or its `planted.json` is missing.
        InvalidInputError: `planted.json` is malformed.

    Example:
        >>> load_planted(default_pair_dir()).task
        'map'
    """
    from jaxpatch.io import load

    folder = Path(folder)
    record_file = folder / "planted.json"
    if not record_file.is_file():
        raise CheckpointNotFoundError(f"{record_file}: not found (a planted pair folder holds "
                                      "base/, donor/, prompts/ and planted.json)")
    try:
        record = json.loads(record_file.read_text())
        settings = record["settings"]
        plant, task = str(settings["plant"]), str(settings["task"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InvalidInputError(f"{record_file}: not a planted-pair record ({e})") from None
    base, donor = load(folder / "base"), load(folder / "donor")
    return PlantedPair(folder, base, donor, plant, task,
                       read_prompts(folder / "prompts" / f"{task}.jsonl"),
                       read_prompts(folder / "prompts" / f"{task}-eval.jsonl"), record)


# ---------------------------------------------------------------------------------- behavior

def task_accuracy(config: ModelConfig, params: Params, prompts: Sequence[Prompt]) -> float:
    """The share of prompts whose greedy continuation equals their whole target.

    Example:
        >>> pair = load_planted(default_pair_dir())
        >>> task_accuracy(pair.base.config, pair.base.params, pair.eval_prompts[:8])
        0.0
    """
    targets = [p.target or () for p in prompts]
    out = greedy_continuations(config, params, prompts, max(len(t) for t in targets))
    return float(np.mean([tuple(o[: len(t)]) == t for o, t in zip(out, targets)]))


def behavior(pair: PlantedPair) -> dict[str, float]:
    """Task accuracy of the base, the donor, the base with S patched in from the donor, and
    the donor with S reverted to the base.

    Example:
        >>> behavior(load_planted(default_pair_dir()))
        {'base': 0.0, 'donor': 0.9609375, 'base_with_S_from_donor': 0.93359375, 'donor_with_S_from_base': 0.0}
    """
    config = pair.base.config
    plant = plant_patch(config, pair.plant)
    models = {"base": pair.base.params, "donor": pair.donor.params,
              "base_with_S_from_donor": apply(plant, pair.base.params, pair.donor.params),
              "donor_with_S_from_base": apply(plant, pair.donor.params, pair.base.params)}
    return {name: task_accuracy(config, params, pair.eval_prompts) for name, params in models.items()}


def importance(result: SweepResult) -> np.ndarray:
    """How strongly a method says each component matters: the size of its effect."""
    return np.abs(result.effect)


# -------------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class Evaluation:
    """What `evaluate` measured (everything `write_run` saves and the report shows).

    Attributes:
        summary: the JSON document (`results.json`): pair, behavior, per-granularity names,
            planted labels, importances and AUCs, narrow-then-verify, timings.
        results: the full tables of the sweep-like methods, by `"{granularity}/{method}"`.
    """

    summary: dict[str, Any]
    results: dict[str, SweepResult]


def _activation(pair: PreparedPair, metric: LogProb, direction: PairDirection,
                execution: Execution, granularity: ScoredGranularity) -> SweepResult:
    return activation_patching(pair, metric, granularity=granularity, direction=direction,
                               execution=execution)


def stage_count(granularities: Sequence[ScoredGranularity]) -> int:
    """How many stages `evaluate` reports to its `stage` callback: the behavior, one per
    evaluated method, narrow-then-verify when neurons are scored, and the hierarchy and the
    faithfulness curves when modules are.

    Example:
        >>> stage_count(("module", "head", "neuron")), stage_count(("module",)), stage_count(("head",))
        (13, 12, 10)
    """
    return 1 + len(EVALUATED_METHODS) + ("neuron" in granularities) + 2 * ("module" in granularities)


def hierarchy_against_plant(graph: dict[str, Any], labels: dict[str, bool],
                            activation: float) -> dict[str, Any]:
    """How a hierarchy's roles compare with a planted set (module granularity).

    Arguments:
        graph: `Hierarchy.graph()`.
        labels: component -> in S.
        activation: what counts as a high activation-patching score.

    Returns:
        precision and recall of `source` against S, the sources outside S, and of the
        components outside S with a high activation score: how many, how many were not called
        sources, and how many were called aggregation or execution (with their reasons).

    Example:
        >>> g = {"nodes": [{"name": "a", "class": "source", "activation_score": 0.9, "reason": ""},
        ...                {"name": "b", "class": "aggregation", "activation_score": 0.8,
        ...                 "reason": "r"}]}
        >>> hierarchy_against_plant(g, {"a": True, "b": False}, 0.3)["precision"]
        1.0
    """
    nodes = graph["nodes"]
    sources = {n["name"] for n in nodes if n["class"] == "source"}
    planted = {n for n, y in labels.items() if y}
    flagged = [n for n in nodes if not labels[n["name"]] and n["activation_score"] >= activation]
    downstream = [n for n in flagged if n["class"] in ("aggregation", "execution")]
    return {"precision": len(sources & planted) / len(sources) if sources else 0.0,
            "recall": len(sources & planted) / len(planted) if planted else 0.0,
            "sources": sorted(sources), "sources_outside_S": sorted(sources - planted),
            "outside_S_high_activation": len(flagged),
            "outside_S_high_activation_not_source": sum(n["class"] != "source" for n in flagged),
            "outside_S_aggregation_or_execution": len(downstream),
            "downstream_reasons": {n["name"]: f"{n['class']}: {n['reason']}" for n in downstream}}


def evaluate(pair: PlantedPair, *,
             granularities: Sequence[ScoredGranularity] = SCORED_GRANULARITIES,
             ig_steps: int = 16, learned_steps: int = 200, learned_budget: float = 0.1,
             verify_fraction: float | None = None, controls: int = 6,
             recall_k: int = 20, seed: int = 0, exhaustive_neurons: bool | None = None,
             stages: Sequence[str] | None = None,
             stage: Callable[[str, int], Any] | None = None) -> Evaluation:
    """Runs every method at every granularity and scores it against the planted set.

    Arguments:
        pair: the planted pair.
        granularities: which of module, head, neuron.
        ig_steps: integrated-gradients quadrature points.
        learned_steps, learned_budget: the learned patch (denoise) trains this many steps with
            sparsity `learned_budget / number of components` (so keeping every component would
            cost `learned_budget` of the effect); its gate probabilities are its ranking.
        verify_fraction, controls, recall_k: narrow-then-verify at neuron granularity: rank
            by integrated gradients, verify exactly this share of all neurons (the top ones
            and `controls` random others) and report the recall of the exact top `recall_k`.
            Default: 0.1, or 0.02 when neurons are not swept exhaustively (on a real model,
            each verified neuron is a forward pass of the whole model).
        seed: the random baseline's and the control sample's seed.
        exhaustive_neurons: sweep every neuron exactly (to rank them all and to measure the
            recall of the exhaustive top); False narrows instead and measures the recall of S's
            own exact top `recall_k`; None: exhaustive up to `EXHAUSTIVE_NEURONS` neurons.
        stages: run only these stages (`STAGES`; the behavior always runs); the methods not
            run are reported as not run. Default: all.
        stage: called as `stage(name, total)` at the start of each stage; returns an object
            with `update(n)` and `close()` (a progress bar), or None.

    Returns:
        An `Evaluation`.

    Example:
        `ev` is `evaluate(load_planted(default_pair_dir()), granularities=("module",))`
        (computed once for all examples):

        >>> module = ev.summary["granularities"]["module"]
        >>> len(module["names"]), sum(module["planted"]), round(module["auc"]["exact-noise"], 2)
        (39, 11, 0.92)
    """
    base, donor, config = pair.base, pair.donor, pair.base.config
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise InvalidInputError(f"unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)})")
    metric = LogProb()
    batch = make_batch(config, pair.prompts, "targets")
    from jaxpatch.runs.fingerprint import checkpoint_fingerprint

    inputs = {"base": checkpoint_fingerprint(base), "donor": checkpoint_fingerprint(donor)}
    prepared = prepare(base, donor, batch, positions="targets", inputs=inputs)
    quiet = Execution(progress=False)
    _, base_score, donor_score, _ = prepared.endpoints(metric)
    plant = plant_patch(config, pair.plant)
    timing: dict[str, float] = {}
    results: dict[str, SweepResult] = {}
    importances: dict[str, dict[str, np.ndarray]] = {g: {} for g in granularities}
    items = {g: select(config, None, g) for g in granularities}

    def run_stage(name: str, fn: Callable[[ScoredGranularity], SweepResult | np.ndarray | None],
                  which: Sequence[ScoredGranularity] = granularities) -> None:
        if stages is not None and name not in stages:
            which = []
        bar = stage(name, len(which)) if stage else None
        t0 = time.perf_counter()
        for g in which:
            out = fn(g)
            if isinstance(out, SweepResult):
                results[f"{g}/{name}"] = out
                importances[g][name] = importance(out)
            elif out is not None:
                importances[g][name] = np.asarray(out, np.float64)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        timing[name] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    bar = stage("behavior", 1) if stage else None
    accuracy = behavior(pair)
    if bar:
        bar.update(1)
        bar.close()
    timing["behavior"] = round(time.perf_counter() - t0, 2)

    verification: dict[str, Any] = {}

    if exhaustive_neurons is None:
        exhaustive_neurons = "neuron" not in items or len(items["neuron"]) <= EXHAUSTIVE_NEURONS

    def narrow_then_verify(g: ScoredGranularity) -> None:  # neuron granularity: also the exact denoise sweep
        share = verify_fraction if verify_fraction is not None else (
            0.1 if exhaustive_neurons else 0.02)
        budget = max(1, int(share * len(items[g])))
        verify = Verification(top_k=max(1, budget - controls), controls=min(controls, budget - 1),
                              exhaustive=exhaustive_neurons, recall_k=recall_k, seed=seed)
        report = localize(prepared, metric, granularity=g, method="integrated-gradients",
                          steps=ig_steps, verify=verify, execution=quiet)
        results[f"{g}/integrated-gradients"] = report.attribution
        importances[g]["integrated-gradients"] = importance(report.attribution)
        results[f"{g}/verified"] = report.exact
        recall, reference = report.recall, "exhaustive"
        if report.exhaustive is not None:
            results[f"{g}/exact-denoise"] = report.exhaustive
            importances[g]["exact-denoise"] = importance(report.exhaustive)
        else:  # S's own neurons, patched one at a time: the ground truth for the recall
            in_s = sweep(prepared, metric, granularity=g, selector=pair.plant,
                         direction="denoise", execution=quiet)
            results[f"{g}/exact-denoise-S"] = in_s
            order = np.argsort(-importance(in_s), kind="stable")[:recall_k]
            top = {in_s.names[i] for i in order}
            recall, reference = len(top & set(report.shortlist)) / len(top), "planted"
        verification.update({
            "granularity": g, "method": "integrated-gradients", "recall_k": recall_k,
            "top_k": len(report.shortlist), "controls": len(report.controls),
            "verified_fraction": (len(report.shortlist) + len(report.controls)) / len(items[g]),
            "spearman": report.spearman, "recall": recall, "reference": reference,
            "shortlist": report.shortlist,
            "misranked": misranked_to_dicts(report.misranked)})

    exhaustive: list[ScoredGranularity] = [g for g in granularities if g != "neuron"]
    full: list[ScoredGranularity] = [g for g in granularities if g != "neuron" or exhaustive_neurons]
    if "neuron" in granularities:
        run_stage("narrow-then-verify", narrow_then_verify, ["neuron"])
    run_stage("exact-denoise", lambda g: sweep(prepared, metric, granularity=g,
                                               direction="denoise", execution=quiet), exhaustive)
    run_stage("exact-noise", lambda g: sweep(prepared, metric, granularity=g, direction="noise",
                                             execution=quiet), full)
    run_stage("first-order", lambda g: attribute(prepared, metric, granularity=g, execution=quiet))
    run_stage("integrated-gradients", lambda g: attribute(
        prepared, metric, granularity=g, method="integrated-gradients", steps=ig_steps,
        execution=quiet), exhaustive)
    for direction in PAIR_DIRECTIONS:
        run_stage(f"activation-{direction}", functools.partial(
            _activation, prepared, metric, direction, quiet), full)
    learned: dict[str, Any] = {}

    def learned_patch(g: ScoredGranularity) -> np.ndarray:
        out = learn_patch(prepared, metric, granularity=g, sparsity=learned_budget / len(items[g]),
                          training=GateTraining(steps=learned_steps))
        learned[g] = {"selected": out.selected, "effect": out.effect, "sparsity": out.sparsity,
                      "steps": learned_steps}
        return out.probabilities

    run_stage("learned-patch", learned_patch, full)
    hierarchy: dict[str, Any] = {}

    def trace_stage(g: ScoredGranularity) -> None:
        runs = [results.get(f"{g}/{name}") for name in (
            "exact-denoise", "exact-noise", "activation-denoise", "activation-noise")]
        given = Behavior(*runs) if all(r is not None for r in runs) else None  # type: ignore[arg-type]
        traced = trace_hierarchy(prepared, metric, granularity=g, behavior=given, execution=quiet)
        labels = dict(zip([c.name for c in items[g]],
                          planted_labels(config, plant, items[g]).tolist()))
        hierarchy.update(traced.graph())
        hierarchy["planted"] = hierarchy_against_plant(hierarchy, labels,
                                                       traced.settings["thresholds"]["activation"])

    if "module" in granularities:
        run_stage("hierarchy", trace_stage, ["module"])
    run_stage("delta-norm", lambda g: delta_norms(config, base.params, donor.params, items[g]))
    rng = np.random.default_rng(seed)
    run_stage("random", lambda g: rng.random(len(items[g])))

    curves: dict[str, dict[str, Any]] = {}

    def faithfulness_stage(g: ScoredGranularity) -> None:  # every ranking, and S's own curve
        names = [c.name for c in items[g]]
        inside = planted_labels(config, plant, items[g])
        orders = {"S first": [n for n, y in zip(names, inside) if y]
                  + [n for n, y in zip(names, inside) if not y]}
        orders.update({m: ranking(dict(zip(names, importances[g][m].tolist())), "size")
                       for m in EVALUATED_METHODS if m in importances[g]})
        for direction in PAIR_DIRECTIONS:
            curves[direction] = {m: c.to_dict() for m, c in faithfulness_curves(
                prepared, metric, orders, granularity=g, direction=direction,
                execution=quiet).items()}

    if "module" in granularities:
        run_stage("faithfulness", faithfulness_stage, ["module"])
    per_granularity = {}
    for g in granularities:
        labels = planted_labels(config, plant, items[g])
        per_granularity[g] = {
            "names": [c.name for c in items[g]], "planted": labels.tolist(),
            "importance": {m: importances[g][m].tolist() if m in importances[g] else None
                           for m in EVALUATED_METHODS},
            "auc": {m: roc_auc(importances[g][m], labels) if m in importances[g] else None
                    for m in EVALUATED_METHODS},
            "exhaustive": g != "neuron" or exhaustive_neurons,
        }
    ig = results.get(f"{granularities[0]}/integrated-gradients")
    summary = {
        "format": RESULTS_FORMAT,
        "pair": {"folder": str(pair.folder), "plant": pair.plant, "task": pair.task,
                 "seed": pair.record["settings"].get("seed"), "settings": pair.record["settings"],
                 "base_text": pair.record.get("base", {}).get("text"), "inputs": inputs,
                 "movement": {g: m["summary"] for g, m in pair.record.get("movement", {}).items()}},
        "metric": {"name": metric.name, "prompts": len(pair.prompts),
                   "base_score": base_score, "donor_score": donor_score},
        "behavior": accuracy, "granularities": per_granularity, "narrow_then_verify": verification,
        "learned_patch": learned, "hierarchy": hierarchy, "faithfulness": curves,
        "completeness": ig.extra.get("completeness") if ig else None,
        "timing": timing, "seed": seed,
    }
    return Evaluation(summary, results)
