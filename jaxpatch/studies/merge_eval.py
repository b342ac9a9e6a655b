"""Merging evaluated on a set of experts fine-tuned from one base: does knowing where each
capability lives beat merges that look at no data?

An expert set (`jaxpatch.studies.expert_set`: a planted pair with experts, or the real experts
of `python -m experiments.experts`) is merged, every pair, triple, ... of its experts, by:

    data-free      linear (equal weights), task_arithmetic, ties, dare_linear, dare_ties,
                   breadcrumbs, breadcrumbs_ties, model_stock, consensus_ta, each over a small
                   grid of its parameters (`GRID`); the best setting by average normalized
                   accuracy is reported (which favors them)
    weight_patching (granularity, conflict)
                   score-guided (`jaxpatch.merge.guided.stitch`): each expert localized in the
                   noise direction on its own localization prompts, exactly on a small model and
                   by integrated gradients on a large one (`localize_experts`); an expert
                   carries the components whose effect reaches `threshold` times its largest
                   (`carried`); conflicts by `winner`, `score_weighted` or `source_set`; the
                   uncarried rest from the base or a data-free merge (`REST`, the best reported)
    localize-and-stitch
                   the literature's localization-based merge that uses the same data (He et
                   al., 2024): per expert a sparse mask learned on its task (`learn_patch`,
                   denoise, module granularity), the masked deltas stitched with overlaps
                   averaged
    tall_masks     TALL masks (Wang et al., 2024): task arithmetic's merged vector, and per task
                   the mask of the elements where that expert's task vector outweighs the others'
                   (`jaxpatch.merge.methods.tall_masks`, lambda `TALL_LAMBDA`): each task is
                   judged on its own masked model (one stored mask per task, not one model)

and each merged model is judged on every merged expert's held-out set. Accuracy is reported
raw and normalized by the expert's own accuracy (as merging papers report it), with the average
and the worst task, and the merged model's general language-modeling loss where the set has
general text.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import flatten_params, unflatten_dotted
from jaxpatch.attribution import attribute
from jaxpatch.engine import prepare, sweep
from jaxpatch.learned import GateTraining, learn_patch
from jaxpatch.merge.config import PARAMETERS, MergeConfig, ModelEntry
from jaxpatch.merge.guided import Conflict, stitch
from jaxpatch.merge.methods import sum_models, tall_masks
from jaxpatch.merge.run import merge_models_in_memory
from jaxpatch.metrics import LogProb
from jaxpatch.models.model import Model
from jaxpatch.modes import SCORED_GRANULARITIES
from jaxpatch.runs.log import TaskLog, memo
from jaxpatch.runs.settings import Execution
from jaxpatch.studies.evaluate import EXHAUSTIVE_NEURONS
from jaxpatch.studies.expert_set import ExpertSet, load_expert_set

__all__ = ["GRID", "DATA_FREE", "REST", "CONFLICTS", "TALL_LAMBDA", "MERGE_EVAL_FORMAT",
           "localize_experts", "carried", "merge_eval", "table", "summary"]

MERGE_EVAL_FORMAT = "jaxpatch.merge-eval/2"
GRID: dict[str, list[dict[str, Any]]] = {
    "linear": [{}],
    "task_arithmetic": [{"lambda": 0.5}, {"lambda": 1.0}],
    "ties": [{"density": d} for d in (0.2, 0.5, 0.8)],
    "dare_linear": [{"density": d} for d in (0.5, 0.8)],
    "dare_ties": [{"density": d} for d in (0.5, 0.8)],
    "breadcrumbs": [{"density": 0.8, "gamma": 0.01}],
    "breadcrumbs_ties": [{"density": 0.8, "gamma": 0.01}],
    "model_stock": [{}],
    "consensus_ta": [{"k": 2, "mask_lambda": 0.4}],
}
"""The data-free methods' parameter grids (weight 1 for every expert where a method has one)."""
REST: tuple[str, ...] = ("base", "task_arithmetic")
"""Where the score-guided merges take what no expert carries (each one a setting)."""
CONFLICTS: tuple[Conflict, ...] = ("winner", "score_weighted", "source_set")
TALL_LAMBDA = 0.4
IG_STEPS = 8
"""Quadrature points of the integrated gradients each expert is localized by."""


def localize_experts(experts: ExpertSet, *, learned_steps: int = 200,
                     learned_sparsity: float = 0.01,
                     log: TaskLog | None = None) -> dict[str, dict[str, Any]]:
    """Each expert's localization: its noise-direction effect per module, head and neuron, and
    the modules of a learned denoise patch.

    The effects are exact one-at-a-time sweeps on a small model (at most `EXHAUSTIVE_NEURONS`
    neurons) and integrated gradients along the path from the expert to the base on a larger
    one: there an exact sweep costs a forward pass per component, and the expert's
    log-probability of its own answers saturates, so reverting any single module barely moves
    it (measured on the `facts` expert of gemma-3-270m: the largest exact module effect 0.0001,
    the sum of all 236 below 0.001), while the path integral credits each component with its
    share (its positive neuron scores sum to 0.82). On the planted pair the exact
    sweep is the better of the two (with integrated gradients the `map` expert's carried
    modules alone keep none of its task; exactly, all of it).

    Arguments:
        experts: the set.
        learned_steps, learned_sparsity: the learned patch's optimizer steps and penalty.
        log: a resumable run's log: each expert's localization is recorded once finished.

    Returns:
        task -> {"effects": {granularity: {component: effect}}, "learned": [module, ...],
        "method": how the effects were scored}.
    """
    config = experts.base.config
    exact = config.n_layers * config.d_ff <= EXHAUSTIVE_NEURONS
    method = "exact (noise)" if exact else f"integrated-gradients (noise, {IG_STEPS} steps)"

    def localized(task: str) -> dict[str, Any]:
        started = time.perf_counter()
        t = experts.tasks[task]
        prepared = prepare(experts.base, t.expert, t.localize, positions="targets")
        quiet = Execution(progress=False)
        effects = {}
        for granularity in SCORED_GRANULARITIES:
            result = (sweep(prepared, LogProb(), granularity=granularity, direction="noise",
                            execution=quiet) if exact else
                      attribute(prepared, LogProb(), granularity=granularity, direction="noise",
                                method="integrated-gradients", steps=IG_STEPS, execution=quiet))
            effects[granularity] = dict(zip(result.names, result.effect.tolist()))
        learned = learn_patch(prepared, LogProb(), sparsity=learned_sparsity,
                              training=GateTraining(steps=learned_steps))
        return {"effects": effects, "learned": learned.selected, "method": method,
                "seconds": round(time.perf_counter() - started, 1)}

    return {task: memo(log, f"localized {task}", lambda t=task: localized(t))
            for task in experts.tasks}


def carried(effects: dict[str, float], threshold: float) -> dict[str, float]:
    """The components an expert carries: those whose effect reaches `threshold` times its
    largest effect (relative, so experts whose single effects are all small, as in a real
    fine-tune that moved every weight, still carry their strongest components).

    Example:
        >>> carried({"a": 0.5, "b": 0.06, "c": 0.04, "d": -0.3}, 0.1)
        {'a': 0.5, 'b': 0.06}
    """
    top = max(effects.values(), default=0.0)
    if top <= 0:
        return {}
    return {n: e for n, e in sorted(effects.items(), key=lambda kv: -kv[1])
            if e >= threshold * top}


def _data_free(method: str, params: dict[str, Any], base: Model, chosen: list[Model],
               names: list[str]) -> Model:
    spec = PARAMETERS[method]
    per_model = {k: v for k, v in params.items() if spec[k][0] == "model"}
    if "weight" in spec:
        per_model["weight"] = 1.0
    shared = {k: v for k, v in params.items() if spec[k][0] == "shared"}
    config = MergeConfig(method, None if method == "linear" else Path("base"),  # type: ignore[arg-type]
                         tuple(ModelEntry(Path(n), per_model) for n in names),
                         shared, None, "merge-eval")
    return merge_models_in_memory(config, None if method == "linear" else base, chosen)


def _tall_mask_models(base: Model, chosen: list[Model]) -> Iterator[Model]:
    """Per expert, in turn, the base plus task arithmetic's merged vector under that expert's
    TALL mask. The masks (as booleans) and the merged vector are computed once; each task's
    model is built when asked for, so one model is held at a time (a model per expert at once
    does not fit beside four real experts)."""
    flat_base = flatten_params(base.params)
    flats = [flatten_params(m.params) for m in chosen]
    masks: dict[str, jax.Array] = {}
    merged: dict[str, jax.Array] = {}
    for name, leaf in flat_base.items():
        tensors = jnp.stack([f[name] for f in flats])
        masks[name] = tall_masks(leaf, tensors, TALL_LAMBDA).astype(jnp.bool_)
        merged[name] = sum_models(tensors.astype(jnp.float32) - leaf.astype(jnp.float32))
    for i in range(len(chosen)):
        out = {name: (leaf.astype(jnp.float32) + masks[name][i] * merged[name]).astype(leaf.dtype)
               for name, leaf in flat_base.items()}
        yield dataclasses.replace(base, params=unflatten_dotted(out), source=None)


def merge_eval(folder: str | Path, *, threshold: float = 0.1, eval_prompts: int | None = 128,
               learned_steps: int = 200, progress: Callable[[str], Any] | None = None,
               log: TaskLog | None = None) -> dict[str, Any]:
    """Merges every combination of two or more of the set's experts with every method and
    judges each merged model on every merged task.

    Arguments:
        folder: an expert set (`jaxpatch.studies.expert_set.load_expert_set`).
        threshold: score-guided merges: an expert carries the components whose effect reaches
            this share of its largest (`carried`).
        eval_prompts: held-out items per task (the first of each task's file; None: all).
        learned_steps: steps of the learned masks (localize-and-stitch).
        progress: called with a line per finished combination.
        log: a resumable run's log: localizations and finished combinations are recorded
            and read back instead of recomputed.

    Returns:
        The `merge_eval.json` document: per combination, per method, the accuracy and the
        normalized accuracy per task, their average and worst, the general text loss and the
        chosen setting; each expert's own accuracy and that of its carried modules alone
        patched into the base; the base's; the localizations; timing (`seconds`: this call;
        each localization and combination records its own, also when replayed from a log).
    """
    started = time.perf_counter()
    experts = load_expert_set(folder, eval_prompts)
    base = experts.base
    located = localize_experts(experts, learned_steps=learned_steps, log=log)
    sets = {t: {g: carried(v["effects"][g], threshold) for g in SCORED_GRANULARITIES}
            for t, v in located.items()}
    own = memo(log, "expert accuracy", lambda: {
        t: experts.tasks[t].accuracy(task.expert) for t, task in experts.tasks.items()})

    def judged(model: Model, tasks: tuple[str, ...], setting: dict[str, Any]) -> dict[str, Any]:
        return _row({t: experts.tasks[t].accuracy(model) for t in tasks}, own, setting,
                    experts.text_loss(model) if experts.text_loss else None)

    combos = [c for k in range(2, len(experts.tasks) + 1)
              for c in itertools.combinations(experts.tasks, k)]

    def merged_combination(combo: tuple[str, ...]) -> dict[str, Any]:
        started = time.perf_counter()
        chosen = [experts.tasks[t].expert for t in combo]
        methods: dict[str, Any] = {}
        rests: dict[str, Model | None] = {"base": None}

        def graded(method: str, grid: list[dict[str, Any]]
                   ) -> Iterator[tuple[dict[str, Any], Model]]:
            """Each setting's judgment and merged model, built lazily: `_best` then holds one
            merged model at a time beside the best."""
            for params in grid:
                model = _data_free(method, params, base, chosen, list(combo))
                yield judged(model, combo, params), model

        for method, grid in GRID.items():
            methods[method], model = _best(graded(method, grid))
            if method in REST:  # its best setting takes what no expert carries
                rests[method] = model
            del model
        for granularity in SCORED_GRANULARITIES:
            for conflict in CONFLICTS:
                rows = ((judged(stitch(base, chosen, [sets[t][granularity] for t in combo],
                                       [1.0] * len(combo), 0.0, conflict, rests[rest]), combo,
                                {"threshold": threshold, "rest": rest}), None)
                        for rest in REST)
                methods[f"weight_patching ({granularity}, {conflict})"] = _best(rows)[0]
        masks = [{m: 1.0 for m in located[t]["learned"]} for t in combo]
        methods["localize-and-stitch"] = judged(
            stitch(base, chosen, masks, [1.0] * len(combo), 0.5, "score_weighted"), combo,
            {"learned_steps": learned_steps})
        accuracy = {t: experts.tasks[t].accuracy(m)
                    for t, m in zip(combo, _tall_mask_models(base, chosen))}
        methods["tall_masks"] = _row(accuracy, own, {"mask_lambda": TALL_LAMBDA}, None)
        overlap = [_jaccard(sets[a]["module"], sets[b]["module"])
                   for a, b in itertools.combinations(combo, 2)]
        return {"methods": methods, "source_overlap": float(np.mean(overlap)),
                "seconds": round(time.perf_counter() - started, 1)}

    results: dict[str, Any] = {}
    for combo in combos:
        key = "+".join(combo)
        results[key] = memo(log, key, lambda c=combo: merged_combination(c))
        if progress:
            progress(key)
    alone = memo(log, "carried alone", lambda: {
        t: {g: experts.tasks[t].accuracy(stitch(base, [experts.tasks[t].expert], [sets[t][g]],
                                                [1.0], 0.0, "winner"))
            for g in SCORED_GRANULARITIES} for t in experts.tasks})
    base_row = memo(log, "base", lambda: _row(
        {t: task.accuracy(base) for t, task in experts.tasks.items()}, own, {},
        experts.text_loss(base) if experts.text_loss else None))
    return {"format": MERGE_EVAL_FORMAT, "set": str(experts.folder), "experts": list(experts.tasks),
            "expert_accuracy": own, "held_out_items": {t: task.items for t, task in
                                                       experts.tasks.items()},
            "base": base_row,
            "expert_text_loss": {t: experts.text_loss(task.expert) for t, task in
                                 experts.tasks.items()} if experts.text_loss else None,
            "carried_alone": alone,
            "localization": {t: {"method": v["method"], "learned": v["learned"],
                                 "carried": {g: sorted(sets[t][g]) for g in ("module", "head")},
                                 "carried_neurons": len(sets[t]["neuron"]),
                                 "seconds": v.get("seconds")}
                             for t, v in located.items()},
            "grid": GRID, "rest": list(REST), "threshold": threshold, "eval_prompts": eval_prompts,
            "combinations": results, "seconds": round(time.perf_counter() - started, 1)}


def _row(accuracy: dict[str, float], own: dict[str, float], setting: dict[str, Any],
         text_loss: float | None) -> dict[str, Any]:
    """A merged model's judgment: accuracy per task, normalized by the expert's own (None
    where the expert scores 0), their average and worst, the text loss and the setting."""
    normalized = {t: a / own[t] if own[t] > 0 else None for t, a in accuracy.items()}
    known = [v for v in normalized.values() if v is not None]
    return {"accuracy": accuracy, "normalized": normalized,
            "average": float(np.mean(known)) if known else 0.0,
            "worst": float(min(known)) if known else 0.0,
            "text_loss": text_loss, "setting": setting}


T = TypeVar("T")


def _best(candidates: Iterable[tuple[dict[str, Any], T]]) -> tuple[dict[str, Any], T]:
    """The (row, payload) whose row has the highest average normalized accuracy (the first
    among equals). A lazy iterable keeps only the best and the current payload alive."""
    return max(candidates, key=lambda c: c[0]["average"])


def _jaccard(a: dict[str, float], b: dict[str, float]) -> float:
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 0.0


def table(document: dict[str, Any]) -> str:
    """The markdown table of a `merge_eval` document: average normalized accuracy per method
    and combination, with the worst task and the setting.

    Example:
        >>> doc = {"combinations": {"a+b": {"methods": {"ties": {"average": 0.5, "worst": 0.0,
        ...        "setting": {"density": 0.5}}}}}}
        >>> print(table(doc))
        | method | a+b |
        |---|---|
        | ties | **0.50** (worst 0.00; density 0.5) |
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
            setting = ", ".join(f"{k} {v}" for k, v in row["setting"].items()
                                if k in ("density", "lambda", "rest"))
            average = f"{row['average']:.2f}"
            if row["average"] == best[c]:
                average = f"**{average}**"
            cells.append(f"{average} (worst {row['worst']:.2f}{'; ' + setting if setting else ''})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DATA_FREE = tuple(GRID)
"""The data-free methods' names (the rows `summary` compares score-guided merges with)."""


def summary(document: dict[str, Any]) -> dict[str, Any]:
    """What a `merge_eval` document says about the issue's questions.

    Returns:
        `{"pairs_average": {method: mean over the pairs of its average normalized accuracy},
        "method_average": {method: mean over every combination of its average normalized
        accuracy},
        "best_data_free_on_pairs": (method, value), "combinations": {combo: {"best_data_free":
        (method, average), "best_guided": (method, average), "margin": guided - data-free,
        "over_rest": (what the guided merge's uncarried rest came from, guided - that merge's
        average; the base's is 0), "source_overlap": ..., "interference": 1 - best data-free
        average}}, "guided_wins": combos where the margin is at least 0.03,
        "overlap_interference_correlation": Pearson's r over the pairs (None below three
        pairs), "carried_alone": {task: {granularity: normalized accuracy of the carried
        components alone}}}`.

    Example:
        >>> row = lambda a: {"average": a, "worst": a, "setting": {}}
        >>> doc = {"expert_accuracy": {"a": 1.0, "b": 0.5},
        ...        "carried_alone": {"a": {"module": 0.5}, "b": {"module": 0.5}},
        ...        "combinations": {"a+b": {"source_overlap": 0.2, "methods": {
        ...            "ties": row(0.4), "weight_patching (module, winner)": {
        ...                **row(0.5), "setting": {"rest": "ties"}}}}}}
        >>> s = summary(doc)
        >>> s["best_data_free_on_pairs"], s["guided_wins"], s["carried_alone"]["b"]
        (('ties', 0.4), ['a+b'], {'module': 1.0})
        >>> s["combinations"]["a+b"]["over_rest"]  # the guided merge over ties, its rest
        ('ties', 0.09999999999999998)
        >>> s["method_average"]
        {'ties': 0.4, 'weight_patching (module, winner)': 0.5}
    """
    combos = document["combinations"]
    pairs = [c for c in combos if c.count("+") == 1]
    methods = next(iter(combos.values()))["methods"]
    data_free = [m for m in methods if m in DATA_FREE]
    guided = [m for m in methods if m.startswith("weight_patching")]
    pairs_average = {m: float(np.mean([combos[c]["methods"][m]["average"] for c in pairs]))
                     for m in data_free} if pairs else {}
    per_combo = {}
    for c, entry in combos.items():
        rows = entry["methods"]
        best_free = max(data_free, key=lambda m: rows[m]["average"])
        best_guided = max(guided, key=lambda m: rows[m]["average"])
        rest = rows[best_guided]["setting"].get("rest", "base")
        rest_average = rows[rest]["average"] if rest in rows else 0.0  # the base keeps nothing
        per_combo[c] = {"best_data_free": (best_free, rows[best_free]["average"]),
                        "best_guided": (best_guided, rows[best_guided]["average"]),
                        "margin": rows[best_guided]["average"] - rows[best_free]["average"],
                        "over_rest": (rest, rows[best_guided]["average"] - rest_average),
                        "source_overlap": entry["source_overlap"],
                        "interference": 1 - rows[best_free]["average"]}
    correlation = None
    if len(pairs) >= 3:
        x = [per_combo[c]["source_overlap"] for c in pairs]
        y = [per_combo[c]["interference"] for c in pairs]
        if np.std(x) > 0 and np.std(y) > 0:
            correlation = float(np.corrcoef(x, y)[0, 1])
    own = document["expert_accuracy"]
    method_average = {m: float(np.mean([combos[c]["methods"][m]["average"] for c in combos]))
                      for m in methods}
    return {"pairs_average": pairs_average, "method_average": method_average,
            "best_data_free_on_pairs": max(pairs_average.items(), key=lambda kv: kv[1])
            if pairs_average else None,
            "combinations": per_combo,
            "guided_wins": [c for c, v in per_combo.items() if v["margin"] >= 0.03],
            "overlap_interference_correlation": correlation,
            "carried_alone": {t: {g: a / own[t] if own[t] > 0 else None for g, a in v.items()}
                              for t, v in document["carried_alone"].items()}}
