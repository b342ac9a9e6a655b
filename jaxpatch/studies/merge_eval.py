"""Merging evaluated on a planted pair's experts: does knowing where each capability lives beat
merges that look at no data?

A planted pair folder with experts (`jaxpatch/studies/pairs/default`: the `map` donor and the
`reverse` and `sort` experts, all trained from one drifted model, with overlapping and disjoint
planted sets) is merged, every pair of experts and all three, by:

    data-free      linear (equal weights), task_arithmetic, ties, dare_linear, dare_ties, each
                   over a small grid of its parameters (`GRID`); the best setting by average
                   accuracy is reported (which favors them)
    weight_patching (winner, score_weighted)
                   score-guided (`jaxpatch.merge.guided`): each expert localized by an exact
                   noise-direction sweep of its modules (log-probability of its answers on its
                   own patching prompts), a module carrying a capability when its effect reaches
                   `threshold`; the rest stays the base
    localize-and-stitch
                   the literature's localization-based merge that uses the same data (He et
                   al., 2024): per expert a sparse mask learned on its task (`learn_patch`,
                   denoise, module granularity), the masked deltas stitched with overlaps
                   averaged

and each merged model's exact-match accuracy is measured on every merged expert's held-out
eval prompts.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxpatch.engine import prepare, sweep
from jaxpatch.learned import GateTraining, learn_patch
from jaxpatch.merge.config import MergeConfig, ModelEntry
from jaxpatch.merge.guided import stitch
from jaxpatch.merge.run import merge_models_in_memory
from jaxpatch.metrics import LogProb
from jaxpatch.models.model import Model
from jaxpatch.prompts import make_batch, read_prompts
from jaxpatch.runs.log import TaskLog, memo
from jaxpatch.runs.settings import Execution
from jaxpatch.studies.evaluate import PlantedPair, load_planted, task_accuracy

__all__ = ["GRID", "MERGE_EVAL_FORMAT", "experts_of", "localize_experts", "merge_eval", "table"]

MERGE_EVAL_FORMAT = "jaxpatch.merge-eval/1"
GRID: dict[str, list[dict[str, Any]]] = {
    "linear": [{}],
    "task_arithmetic": [{"lambda": 0.5}, {"lambda": 1.0}],
    "ties": [{"density": d} for d in (0.2, 0.5, 0.8)],
    "dare_linear": [{"density": d} for d in (0.5, 0.8)],
    "dare_ties": [{"density": d} for d in (0.5, 0.8)],
}
"""The data-free methods' parameter grids (weight 1 for every expert)."""


def experts_of(pair: PlantedPair) -> dict[str, Model]:
    """The pair's experts by task: the donor, and every model under `experts/`.

    Example:
        >>> from jaxpatch.studies.evaluate import default_pair_dir
        >>> sorted(experts_of(load_planted(default_pair_dir())))
        ['map', 'reverse', 'sort']
    """
    from jaxpatch.io import load

    out = {pair.task: pair.donor}
    for key, record in pair.record.get("models", {}).items():
        if key.startswith("experts/"):
            out[str(record["task"])] = load(pair.folder / key)
    return out


def localize_experts(pair: PlantedPair, experts: dict[str, Model], *, learned_steps: int = 200,
                     learned_sparsity: float = 0.01,
                     log: TaskLog | None = None) -> dict[str, dict[str, Any]]:
    """Each expert's localization: noise-direction sweep effects per module, and the modules of
    a learned denoise patch.

    Arguments:
        pair: the planted pair (its base, and its prompts folder).
        experts: the experts by task.
        learned_steps, learned_sparsity: the learned patch's optimizer steps and penalty.
        log: a resumable run's log: each expert's localization is recorded once finished.

    Returns:
        task -> {"effects": module -> effect, "learned": [module, ...]}.
    """
    def localized(task: str, expert: Model) -> dict[str, Any]:
        prompts = read_prompts(pair.folder / "prompts" / f"{task}.jsonl")
        batch = make_batch(pair.base.config, prompts, "targets")
        prepared = prepare(pair.base, expert, batch, positions="targets")
        result = sweep(prepared, LogProb(), direction="noise", execution=Execution(progress=False))
        learned = learn_patch(prepared, LogProb(), sparsity=learned_sparsity,
                              training=GateTraining(steps=learned_steps))
        return {"effects": dict(zip(result.names, result.effect.tolist())),
                "learned": learned.selected}

    return {task: memo(log, f"localized {task}", lambda t=task, e=expert: localized(t, e))
            for task, expert in experts.items()}



def _data_free(method: str, params: dict[str, Any], base: Model, chosen: list[Model],
               names: list[str]) -> Model:
    per_model = {k: v for k, v in params.items() if k == "density"}
    shared = {k: v for k, v in params.items() if k != "density"}
    config = MergeConfig(method, None if method == "linear" else Path("base"),  # type: ignore[arg-type]
                         tuple(ModelEntry(Path(n), {"weight": 1.0, **per_model}) for n in names),
                         shared, None, "merge-eval")
    return merge_models_in_memory(config, None if method == "linear" else base, chosen)


def merge_eval(folder: str | Path, *, threshold: float = 0.1, eval_prompts: int = 128,
               learned_steps: int = 200, progress: Callable[[str], Any] | None = None,
               log: TaskLog | None = None) -> dict[str, Any]:
    """Merges every pair of the folder's experts and all of them with every method, and
    measures each merged model's accuracy on every merged task.

    Arguments:
        folder: a planted pair folder with experts.
        threshold: the score-guided merges' effect threshold.
        eval_prompts: accuracy prompts per task (the first of each task's eval file).
        learned_steps: steps of the learned masks (localize-and-stitch).
        progress: called with a line per finished combination.
        log: a resumable run's log: localizations and finished combinations are recorded
            and read back instead of recomputed.

    Returns:
        The `merge_eval.json` document: per combination, per method, the accuracy per task,
        the average and the chosen setting; each expert's own accuracy, and that of its
        localized modules alone patched into the base; the localizations; timing.
    """
    started = time.perf_counter()
    pair = load_planted(folder)
    experts = experts_of(pair)
    evals = {t: read_prompts(pair.folder / "prompts" / f"{t}-eval.jsonl")[:eval_prompts]
             for t in experts}
    located = localize_experts(pair, experts, learned_steps=learned_steps, log=log)
    config = pair.base.config

    def accuracy(model: Model, tasks: tuple[str, ...]) -> dict[str, float]:
        return {t: task_accuracy(config, model.params, evals[t]) for t in tasks}

    combos = [c for k in range(2, len(experts) + 1) for c in itertools.combinations(experts, k)]

    def merged_combination(combo: tuple[str, ...]) -> dict[str, Any]:
        chosen = [experts[t] for t in combo]
        methods: dict[str, Any] = {}
        for method, grid in GRID.items():
            best = None
            for params in grid:
                acc = accuracy(_data_free(method, params, pair.base, chosen, list(combo)), combo)
                row = {"accuracy": acc, "average": float(np.mean(list(acc.values()))),
                       "setting": params}
                if best is None or row["average"] > best["average"]:
                    best = row
            methods[method] = best
        for conflict in ("winner", "score_weighted"):
            merged = stitch(pair.base, chosen, [located[t]["effects"] for t in combo],
                            [1.0] * len(combo), threshold, conflict)
            acc = accuracy(merged, combo)
            methods[f"weight_patching ({conflict})"] = {
                "accuracy": acc, "average": float(np.mean(list(acc.values()))),
                "setting": {"threshold": threshold, "conflict": conflict}}
        masks = [{m: 1.0 for m in located[t]["learned"]} for t in combo]
        merged = stitch(pair.base, chosen, masks, [1.0] * len(combo), 0.5, "score_weighted")
        acc = accuracy(merged, combo)
        methods["localize-and-stitch"] = {"accuracy": acc,
                                          "average": float(np.mean(list(acc.values()))),
                                          "setting": {"learned_steps": learned_steps}}
        return {"methods": methods}

    results: dict[str, Any] = {}
    for combo in combos:
        results["+".join(combo)] = memo(log, "+".join(combo),
                                         lambda c=combo: merged_combination(c))
        if progress:
            progress("+".join(combo))
    experts_accuracy = {t: task_accuracy(config, m.params, evals[t]) for t, m in experts.items()}
    alone = {t: {"weight_patching": accuracy(stitch(pair.base, [m], [located[t]["effects"]], [1.0],
                                                    threshold, "winner"), (t,))[t],
                 "localize-and-stitch": accuracy(stitch(
                     pair.base, [m], [{n: 1.0 for n in located[t]["learned"]}], [1.0], 0.5,
                     "winner"), (t,))[t]}
             for t, m in experts.items()}
    return {"format": MERGE_EVAL_FORMAT, "pair": str(pair.folder),
            "experts": sorted(experts), "expert_accuracy": experts_accuracy,
            "localized_alone": alone,
            "localization": {t: {"selected_by_threshold": sorted(
                m for m, e in v["effects"].items() if e >= threshold), "learned": v["learned"]}
                for t, v in located.items()},
            "grid": GRID, "threshold": threshold, "eval_prompts": eval_prompts,
            "combinations": results, "seconds": round(time.perf_counter() - started, 1)}


def table(document: dict[str, Any]) -> str:
    """The markdown table of a `merge_eval` document: average accuracy per method and
    combination (per-task accuracies in parentheses).

    Example:
        >>> doc = {"combinations": {"a+b": {"methods": {"ties": {"average": 0.5,
        ...        "accuracy": {"a": 1.0, "b": 0.0}, "setting": {"density": 0.5}}}}}}
        >>> print(table(doc))
        | method | a+b |
        |---|---|
        | ties | **0.50** (a 1.00, b 0.00; density 0.5) |
    """
    combos = list(document["combinations"])
    methods = list(next(iter(document["combinations"].values()))["methods"])
    best = {c: max(m["average"] for m in document["combinations"][c]["methods"].values())
            for c in combos}
    lines = ["| method | " + " | ".join(combos) + " |", "|---|" + "---|" * len(combos)]
    for method in methods:
        cells = []
        for c in combos:
            row = document["combinations"][c]["methods"][method]
            accs = ", ".join(f"{t} {a:.2f}" for t, a in row["accuracy"].items())
            setting = ", ".join(f"{k} {v}" for k, v in row["setting"].items()
                                if k in ("density", "lambda"))
            average = f"{row['average']:.2f}"
            if row["average"] == best[c]:
                average = f"**{average}**"
            cells.append(f"{average} ({accs}{'; ' + setting if setting else ''})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
