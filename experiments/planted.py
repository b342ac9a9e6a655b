"""Planted-capability model pairs: a base model and a donor whose capability lives in a known set S.

1. **Base.** A small Llama-style model learns a synthetic language (`experiments.language`).
2. **Drift.** A copy of the base trains further on fresh text with *all* parameters free: every
   component moves by a behavior-irrelevant amount.
3. **Donor.** From the drifted copy, an instruction task (`map`, `reverse` or `sort`) is trained
   with *only S* trainable (gradients outside S are masked to zero, so Adam never moves them),
   until the donor answers `target_accuracy` of the eval prompts (or the step cap fails the build).
4. **Trained decoys.** The donor then learns other objectives with a disjoint set D trainable
   (another instruction, or `text`: a shift in the language's statistics), while a KL term keeps
   the measured task's next-token distributions where they were. D moves at least as far as S.
5. **Function-preserving decoys.** Neurons and key/value heads next to S are rescaled
   (`experiments.decoys`): their weights move far, the donor's function not at all.
6. **Experts.** More donors from the drifted copy, with other instructions and other sets
   (one overlapping S, one disjoint), for merging.

Every check fails the build in one line with exit status 2 and nothing written: a donor that did
not reach its target, a base that already does the task, a decoy or rescaling that changed the
donor's task accuracy by more than `max_accuracy_change`, a decoy that moved less than S.

Why |dW| (rank components by how far their weights moved) fails here: S moves far, but so do D
(trained on something else) and the rescaled neighbours of S (which do nothing); drift moves
everything a little (`--drift-steps`, `--drift-lr` set how much). Weight patching measures what a
component's change does to the behavior, so none of that fools it.

S, D, the rescaled components and the experts are drawn from the seed (`experiments.draws`)
unless given. Everything is deterministic for a seed. The output folder holds Hugging Face
checkpoints with a `tokenizer.json` (`base/`, `donor/`, `experts/<task>/`), the prompts
(`prompts/<task>.jsonl` for patching, `prompts/<task>-eval.jsonl` for accuracy) and
`planted.json` (the resolved settings, the sets, step counts, losses, accuracies, and how far
every component's weights moved). The shipped default pair is rebuilt with

    python -m experiments.planted --out jaxpatch/studies/pairs/default --overwrite
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.decoys import rescale
from experiments.draws import draw_sets
from experiments.language import (
    TASKS,
    Language,
    next_word_accuracy,
    task_batches,
    text_batches,
    tokenizer,
)
from experiments.training import model_config, next_token_loss, retaining, train, trainable_mask
from jaxpatch._tree import flatten_params
from jaxpatch.components import select
from jaxpatch.errors import JaxpatchError
from jaxpatch.io import save
from jaxpatch.models.config import ModelConfig, Params, init_params
from jaxpatch.models.decoder import forward
from jaxpatch.models.model import Model
from jaxpatch.modes import SCORED_GRANULARITIES
from jaxpatch.pair import delta_norms
from jaxpatch.patch import apply
from jaxpatch.prompts import Prompt
from jaxpatch.studies.evaluate import task_accuracy
from jaxpatch.studies.scoring import plant_patch, planted_labels

__all__ = ["DECOY_TASKS", "Settings", "parse_job", "resolve", "check_sets", "build", "check_donor",
           "movement", "without_decoys", "write", "main"]

DECOY_TASKS: tuple[str, ...] = (*TASKS, "text")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a build needs (all recorded in `planted.json`, resolved: drawn sets written out).

    `plant`, `decoys`, `rescale` and `experts` left empty / None are drawn from the seed
    (`experiments.draws.draw_sets`); an empty tuple means none.
    """

    seed: int = 0
    task: str = "map"
    plant: str = ""
    decoys: tuple[str, ...] | None = None  # TASK=SELECTOR, TASK in DECOY_TASKS
    rescale: tuple[str, ...] | None = None  # neurons and key/value heads (values against outputs)
    experts: tuple[str, ...] | None = None  # TASK=SELECTOR
    layers: int = 4
    d_model: int = 64
    heads: int = 4
    d_ff: int = 128
    n_words: int = 32
    length: int = 4
    base_steps: int = 800
    drift_steps: int = 300
    task_steps: int = 8000  # the cap: the donor trains until target_accuracy or this many steps
    decoy_steps: int = 1500
    batch: int = 32
    seq: int = 20
    base_lr: float = 3e-3
    drift_lr: float = 5e-4
    task_lr: float = 3e-3
    decoy_lr: float = 1e-2
    retain: float = 1.0  # weight of the KL term that keeps the donor's task while a decoy trains
    retain_base: float = 0.0  # weight of the KL term that keeps the base's outputs on the task
    # prompts with the decoy set patched in (0: the decoy is irrelevant in the donor only)
    rescale_factor: float = 16.0
    target_accuracy: float = 0.95  # a donor below this after task_steps fails the build
    check_every: int = 250  # steps between accuracy checks while the donor trains
    max_base_accuracy: float = 0.05  # a base above this already does the task: the build fails
    max_accuracy_change: float = 0.02  # the most a decoy or rescaling may move task accuracy
    min_decoy_movement: float = 1.0  # D's mean |dW| per module over S's (before rescaling), at least
    patch_prompts: int = 32
    eval_prompts: int = 256


def parse_job(text: str, tasks: Sequence[str] = TASKS, what: str = "expert") -> tuple[str, str]:
    """`TASK=SELECTOR` -> (task, selector).

    Raises:
        JaxpatchError: not of that form, or TASK not one of `tasks`.

    Example:
        >>> parse_job("text=layers.0.mlp", DECOY_TASKS, "decoy")
        ('text', 'layers.0.mlp')
    """
    task, sep, selector = text.partition("=")
    if not sep or task not in tasks or not selector.strip():
        raise JaxpatchError(f"{what} {text!r} must be TASK=SELECTOR with TASK one of {', '.join(tasks)}")
    return task, selector.strip()


def resolve(settings: Settings) -> Settings:
    """The settings with every drawn set written out (what `planted.json` records).

    Example:
        >>> resolve(Settings(seed=3)).plant  # doctest: +NORMALIZE_WHITESPACE
        'layers.0.self_attn[head=1] | layers.0.self_attn[kv_head=1] | layers.1.self_attn[head=1] |
         layers.1.self_attn[kv_head=1] | layers.3.mlp[neuron=48-111]'
        >>> resolve(Settings(decoys=())).decoys
        ()
    """
    s = settings
    if s.plant and None not in (s.decoys, s.rescale, s.experts):
        return s  # nothing to draw (also for architectures draw_sets does not cover)
    collides = None
    if s.plant:  # defaults are drawn around an explicit plant; only explicit collisions are refused
        config = model_config(Language.generate(s.seed, s.n_words, length=s.length), s.layers,
                              s.d_model, s.heads, s.d_ff)
        inside = trainable_mask(config, s.plant)
        collides = lambda selector: _shared(config, inside, selector) is not None
    try:
        drawn = draw_sets(s.seed, s.task, s.layers, s.heads, s.d_ff, collides)
    except ValueError as e:
        raise JaxpatchError(str(e)) from None
    return dataclasses.replace(
        s, plant=s.plant or drawn.plant,
        decoys=drawn.decoys if s.decoys is None else tuple(s.decoys),
        rescale=drawn.rescale if s.rescale is None else tuple(s.rescale),
        experts=drawn.experts if s.experts is None else tuple(s.experts))


def check_sets(config: ModelConfig, settings: Settings) -> None:
    """Refuses, before any training, sets that do not parse or that would blur the labels.

    A decoy must not learn the measured task and must not share a parameter with S; a rescaled
    component must not be in S (rescaling S would change what S's delta is).

    Raises:
        JaxpatchError: naming the set at fault.

    Example:
        >>> cfg = model_config(Language.generate(0), 4, 64, 4, 128)
        >>> try:
        ...     check_sets(cfg, resolve(Settings(decoys=("text=layers.1.mlp",), plant="layers.1.mlp")))
        ... except JaxpatchError as e:
        ...     print(e)
        decoy 'text=layers.1.mlp' shares layers.1.mlp.down_proj.weight with the planted set
    """
    s = settings
    if s.task not in TASKS:
        raise JaxpatchError(f"task {s.task!r} is not one of {', '.join(TASKS)}")
    inside = trainable_mask(config, s.plant)
    for spec in s.decoys or ():
        task, selector = parse_job(spec, DECOY_TASKS, "decoy")
        if task == s.task:
            raise JaxpatchError(f"decoy {spec!r} learns the measured task {s.task}: it would be a "
                                "second source, not a decoy")
        _refuse_overlap(config, inside, selector, f"decoy {spec!r}")
    for selector in s.rescale or ():
        _refuse_overlap(config, inside, selector, f"rescaled set {selector!r}")
    for spec in s.experts or ():
        plant_patch(config, parse_job(spec)[1])


def _shared(config: ModelConfig, inside: Params, selector: str) -> str | None:
    """The first parameter a selector's components share with a mask (None: none)."""
    other = flatten_params(trainable_mask(config, selector))
    for name, mask in flatten_params(inside).items():
        if np.any((np.asarray(mask) > 0) & (np.asarray(other[name]) > 0)):
            return name
    return None


def _refuse_overlap(config: ModelConfig, inside: Params, selector: str, what: str) -> None:
    shared = _shared(config, inside, selector)
    if shared is not None:
        raise JaxpatchError(f"{what} shares {shared} with the planted set")


def check_donor(accuracy: dict[str, float], settings: Settings, steps: int) -> None:
    """Refuses a pair whose ground truth would measure nothing: a donor that did not learn its
    task, or a base that already does it.

    Raises:
        JaxpatchError: naming the accuracy reached, the bound, and what to change.

    Example:
        >>> check_donor({"base": 0.0, "trained": 0.96}, Settings(), 1500)  # fine
        >>> try:
        ...     check_donor({"base": 0.0, "trained": 0.04}, Settings(), 8000)
        ... except JaxpatchError as e:
        ...     print(e)  # doctest: +NORMALIZE_WHITESPACE
        the donor reached 4% map accuracy after 8000 task steps, under the target of 95%: raise
        --task-steps, change --task-lr, or plant a larger set
    """
    s = settings
    if accuracy["trained"] < s.target_accuracy:
        raise JaxpatchError(
            f"the donor reached {accuracy['trained']:.0%} {s.task} accuracy after {steps} task "
            f"steps, under the target of {s.target_accuracy:.0%}: raise --task-steps, change "
            "--task-lr, or plant a larger set")
    if accuracy["base"] > s.max_base_accuracy:
        raise JaxpatchError(
            f"the base already reaches {accuracy['base']:.0%} {s.task} accuracy, over the maximum "
            f"of {s.max_base_accuracy:.0%}: the donor's capability would not be its own")


def _check_unchanged(accuracy: dict[str, float], what: str, settings: Settings) -> None:
    before, after = accuracy["before"], accuracy["after"]
    if abs(after - before) > settings.max_accuracy_change:
        raise JaxpatchError(
            f"{what} moved the donor's {settings.task} accuracy from {before:.1%} to {after:.1%}, "
            f"more than {settings.max_accuracy_change:.0%}: it is not irrelevant to the task "
            "(raise --retain, or choose another set)")


# ----------------------------------------------------------------------------------- building

def build(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Trains the base, the drifted copy, the donor (then its decoys) and the experts.

    Returns:
        A dict with the `Language`, the config, the models' params (`base`, `donor`,
        `experts/<task>`), the donor before its decoys (`donor_without_decoys`), the prompts and
        the record that `planted.json` holds.

    Raises:
        JaxpatchError: a set is refused (`check_sets`), or a check fails (see the module
            docstring).
    """
    s = resolve(settings)
    language = Language.generate(s.seed, s.n_words, length=s.length)
    config = model_config(language, s.layers, s.d_model, s.heads, s.d_ff)
    check_sets(config, s)
    rng = lambda *stream: np.random.default_rng([s.seed, *stream])
    t0 = time.perf_counter()
    text = lambda p, batch: next_token_loss(config, p, *batch)
    base, base_losses, _ = train(init_params(config, jax.random.key(s.seed)), text,
                                 text_batches(language, rng(2), s.batch, s.seq), s.base_steps,
                                 s.base_lr, label="base")
    drift, drift_losses, _ = train(base, text, text_batches(language, rng(3), s.batch, s.seq),
                                   s.drift_steps, s.drift_lr, label="drift")
    prompts: dict[str, tuple[list[Prompt], list[Prompt]]] = {}

    def prompts_of(task: str) -> tuple[list[Prompt], list[Prompt]]:
        if task not in prompts:
            prompts[task] = (language.prompts(rng(5, TASKS.index(task)), task, s.patch_prompts),
                             language.prompts(rng(6, TASKS.index(task)), task, s.eval_prompts))
        return prompts[task]

    def learn(task: str, selector: str, index: int) -> tuple[Params, dict]:
        """Trains `task` from the drifted copy with only `selector` free, until the target."""
        evals = prompts_of(task)[1]
        mask = trainable_mask(config, selector)
        trained = train(drift, text, task_batches(language, rng(4, index), task, s.batch),
                        s.task_steps, s.task_lr, mask=mask, label=task, check_every=s.check_every,
                        stop=lambda p: task_accuracy(config, p, evals) >= s.target_accuracy)
        accuracy = {"base": task_accuracy(config, base, evals),
                    "drift": task_accuracy(config, drift, evals),
                    "trained": task_accuracy(config, trained.params, evals)}
        return trained.params, {"task": task, "plant": selector, "plant_parameters": int(sum(
            np.count_nonzero(m) for m in jax.tree_util.tree_leaves(mask))), "task_steps": trained.steps,
            "task_losses": trained.losses, "accuracy": accuracy}

    donor, donor_record = learn(s.task, s.plant, 0)
    log(f"donor: {s.task} accuracy {donor_record['accuracy']} after {donor_record['task_steps']} steps")
    check_donor(donor_record["accuracy"], s, donor_record["task_steps"])
    before_decoys, accuracy_before = donor, donor_record["accuracy"]["trained"]
    evals = prompts_of(s.task)[1]
    decoy_records = []
    for index, spec in enumerate(s.decoys or ()):
        donor, record = _learn_decoy(config, language, base, donor, spec, s, rng(10, index),
                                     task_batches(language, rng(11, index), s.task, s.batch))
        record["task_accuracy"] = {"before": accuracy_before,
                                   "after": task_accuracy(config, donor, evals)}
        log(f"decoy {spec}: {record}")
        decoy_records.append(record)
        _check_unchanged(record["task_accuracy"], f"decoy {spec!r}", s)
    if s.decoys:  # before any rescaling, which moves S's modules too
        _check_decoy_movement(movement(config, base, donor, s)["module"], s)
    rescaled: dict[str, Any] = {}
    if s.rescale:
        donor, rescaled = _rescale(config, donor, s, evals)
        log(f"rescaled: {rescaled}")
    donor_record["accuracy"].update({
        "before_decoys": accuracy_before,
        "trained": task_accuracy(config, donor, evals),
        "plant_patched_base": task_accuracy(config, apply(plant_patch(config, s.plant), base, donor),
                                            evals)})
    models = {"base": base, "donor": donor}
    records = {"donor": donor_record}
    for index, spec in enumerate(s.experts or (), start=1):
        task, selector = parse_job(spec)
        expert, record = learn(task, selector, index)
        record["accuracy"]["plant_patched_base"] = task_accuracy(
            config, apply(plant_patch(config, selector), base, expert), prompts_of(task)[1])
        models[f"experts/{task}"], records[f"experts/{task}"] = expert, record
        log(f"experts/{task}: {task} accuracy {record['accuracy']} after {record['task_steps']} steps")
    moved = movement(config, base, donor, s)
    record = {
        "format": "jaxpatch.planted/2", "settings": dataclasses.asdict(s),
        "language": {"vocabulary": language.vocabulary, "mapping": language.mapping.tolist()},
        "base": {"losses": base_losses, "text": next_word_accuracy(config, base, language, rng(7))},
        "drift": {"losses": drift_losses, "text": next_word_accuracy(config, drift, language, rng(7))},
        "models": records, "decoys": decoy_records, "rescaled": rescaled, "movement": moved,
    }
    log(f"base text: {record['base']['text']}; drift text: {record['drift']['text']}; trained in "
        f"{time.perf_counter() - t0:.0f} s")
    return {"language": language, "config": config, "models": models, "prompts": prompts,
            "record": record, "donor_without_decoys": before_decoys}


def _learn_decoy(config: ModelConfig, language: Language, base: Params, donor: Params, spec: str,
                 s: Settings, rng: np.random.Generator,
                 task: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[Params, dict]:
    """Trains one decoy on the donor with only its set free, keeping the measured task."""
    objective, selector = parse_job(spec, DECOY_TASKS, "decoy")
    if objective == "text":
        shifted = language.shifted(s.seed)
        source = text_batches(shifted, rng, s.batch, s.seq)

        def learned(p: Params) -> float:
            return next_word_accuracy(config, p, shifted, np.random.default_rng([s.seed, 12]))["loss"]
        measure = "loss on the shifted language"
    else:
        source = task_batches(language, rng, objective, s.batch)
        evals = language.prompts(np.random.default_rng([s.seed, 13]), objective, 128)

        def learned(p: Params) -> float:
            return task_accuracy(config, p, evals)
        measure = f"{objective} accuracy"
    batches = ((ids, w, task_ids, task_w) for (ids, w), (task_ids, task_w) in zip(source, task))
    mask = trainable_mask(config, selector)
    trained = train(donor, retaining(config, donor, s.retain, base, mask, s.retain_base), batches,
                    s.decoy_steps, s.decoy_lr, mask=mask, label=f"decoy {objective}")
    return trained.params, {"task": objective, "plant": selector, "steps": trained.steps,
                            "losses": trained.losses, "measure": measure,
                            "before": learned(donor), "after": learned(trained.params)}


def _rescale(config: ModelConfig, donor: Params, s: Settings, evals: list[Prompt]) -> tuple[Params, dict]:
    """Applies the function-preserving decoys and checks the logits did not move."""
    selector = " | ".join(s.rescale or ())
    out = rescale(config, donor, selector, s.rescale_factor)
    ids = np.array([p.tokens + (p.target or ()) for p in evals])
    logits = [np.asarray(forward(config, p, jnp.asarray(ids)).read(None)) for p in (donor, out)]
    change = float(np.abs(logits[1] - logits[0]).max())
    scale = float(np.abs(logits[0]).max())
    record = {"selectors": list(s.rescale or ()), "factor": s.rescale_factor,
              "max_logit_change": change, "max_logit": scale,
              "task_accuracy": {"before": task_accuracy(config, donor, evals),
                                "after": task_accuracy(config, out, evals)}}
    if change > 1e-4 * max(scale, 1.0):
        raise JaxpatchError(f"rescaling {selector!r} by {s.rescale_factor} changed the donor's "
                            f"logits by {change:.2e}: it is not function-preserving here")
    _check_unchanged(record["task_accuracy"], f"rescaling {selector!r}", s)
    return out, record


def movement(config: ModelConfig, base: Params, donor: Params, settings: Settings) -> dict:
    """How far every component's weights moved from base to donor (the |dW| baseline's norm),
    with which components are in S, in a trained decoy D, or rescaled.

    Returns:
        Per scored granularity: `names`, `norm`, `in_S`, `in_D`, `rescaled` (lists), and
        `summary`: S's smallest and mean norm, D's mean, the largest norm outside S, and the
        ratio of the largest outside S to the smallest in S (above 1: |dW| cannot be perfect).

    Example:
        >>> cfg = model_config(Language.generate(0), 4, 64, 4, 128)
        >>> p = init_params(cfg, jax.random.key(0))
        >>> m = movement(cfg, p, p, resolve(Settings()))
        >>> m["head"]["summary"]["S_min"], sum(m["head"]["in_S"]), sum(m["neuron"]["in_D"])
        (0.0, 4, 64)
    """
    s = settings
    labels_of = lambda selectors, items: (planted_labels(config, plant_patch(config, " | ".join(
        selectors)), items) if selectors else np.zeros(len(items), bool))
    decoy_sets = [parse_job(spec, DECOY_TASKS, "decoy")[1] for spec in s.decoys or ()]
    out = {}
    for g in SCORED_GRANULARITIES:
        items = select(config, None, g)
        norm = delta_norms(config, base, donor, items)
        in_s = labels_of([s.plant], items)
        in_d = labels_of(decoy_sets, items)
        summary = {"S_min": _stat(norm[in_s], np.min), "S_mean": _stat(norm[in_s], np.mean),
                   "D_mean": _stat(norm[in_d], np.mean), "outside_S_max": _stat(norm[~in_s], np.max)}
        low, high = summary["S_min"], summary["outside_S_max"]
        summary["outside_max_over_S_min"] = high / low if low and high is not None else None
        out[g] = {"names": [c.name for c in items], "norm": [round(float(x), 6) for x in norm],
                  "in_S": in_s.tolist(), "in_D": in_d.tolist(),
                  "rescaled": labels_of(list(s.rescale or ()), items).tolist(), "summary": summary}
    return out


def _stat(values: np.ndarray, how: Callable[[np.ndarray], Any]) -> float | None:
    return float(how(values)) if values.size else None


def _check_decoy_movement(module: dict, s: Settings) -> None:
    summary = module["summary"]
    if summary["D_mean"] is None or summary["S_mean"] is None:
        return  # S or D has no module-level parameters to compare
    if summary["D_mean"] < s.min_decoy_movement * summary["S_mean"]:
        raise JaxpatchError(
            f"the decoys moved their modules by {summary['D_mean']:.3f} on average, less than "
            f"{s.min_decoy_movement} x S's {summary['S_mean']:.3f}: |dW| would not be tested "
            "(raise --decoy-lr or --decoy-steps)")


def without_decoys(built: dict) -> dict:
    """The same pair with the donor as it was before its decoys (and no experts): the table's
    control.

    Example:
        >>> config = model_config(Language.generate(0), 4, 64, 4, 128)
        >>> p, q = (init_params(config, jax.random.key(i)) for i in (0, 1))
        >>> built = {"config": config, "models": {"base": p, "donor": q}, "record": {
        ...     "settings": dataclasses.asdict(resolve(Settings())), "models": {"donor": {}}},
        ...     "donor_without_decoys": p}
        >>> plain = without_decoys(built)
        >>> plain["record"]["settings"]["decoys"], plain["models"]["donor"] is p
        ((), True)
    """
    config, base, donor = built["config"], built["models"]["base"], built["donor_without_decoys"]
    record = dict(built["record"])
    settings = Settings(**{**record["settings"], "decoys": (), "rescale": (), "experts": ()})
    donor_record = dict(record["models"]["donor"])
    if settings.task in built.get("prompts", {}):
        evals = built["prompts"][settings.task][1]
        patched = apply(plant_patch(config, settings.plant), base, donor)
        donor_record["accuracy"] = {**donor_record["accuracy"],
                                    "trained": task_accuracy(config, donor, evals),
                                    "plant_patched_base": task_accuracy(config, patched, evals)}
    record.update(settings=dataclasses.asdict(settings), decoys=[], rescaled={},
                  movement=movement(config, base, donor, settings), models={"donor": donor_record})
    return {**built, "models": {"base": base, "donor": donor}, "record": record}


def _prompt_lines(prompts: Sequence[Prompt], language: Language) -> str:
    vocab = language.vocabulary
    lines = []
    for p in prompts:
        target = p.target or ()
        lines.append(json.dumps({"text": " ".join(vocab[t] for t in p.tokens), "tokens": list(p.tokens),
                                 "target": " ".join(vocab[t] for t in target),
                                 "target_tokens": list(target)}) + "\n")
    return "".join(lines)


def write(built: dict, out: str | Path, overwrite: bool = False) -> None:
    """Writes the models, prompts and `planted.json` into `out` (atomically)."""
    from jaxpatch.runs.atomic import atomic_directory

    language, config = built["language"], built["config"]
    tok = tokenizer(language)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name, params in built["models"].items():
            save(Model(config, params, tok), tmp / name)
        (tmp / "prompts").mkdir()
        for task, (patching, evaluation) in built["prompts"].items():
            (tmp / "prompts" / f"{task}.jsonl").write_text(_prompt_lines(patching, language))
            (tmp / "prompts" / f"{task}-eval.jsonl").write_text(_prompt_lines(evaluation, language))
        (tmp / "planted.json").write_text(json.dumps(built["record"], indent=1) + "\n")


_SETS = {"decoys": ("--decoy", "TASK=SELECTOR", "a trained decoy, TASK one of " + ", ".join(DECOY_TASKS)),
         "rescale": ("--rescale", "SELECTOR", "neurons / key/value heads to rescale by --rescale-factor"),
         "experts": ("--expert", "TASK=SELECTOR", "an expert")}


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m experiments.planted",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default="jaxpatch/studies/pairs/default", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for name, (flag, metavar, text) in _SETS.items():
        p.add_argument(flag, dest=name, action="append", metavar=metavar,
                       help=f"{text} (repeatable; default: drawn from the seed)")
        p.add_argument(f"--no-{name}", action="store_true", help=f"no {name}")
    for field in dataclasses.fields(Settings):
        if field.name in _SETS:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        shown = "drawn from the seed" if field.name == "plant" else "%(default)s"
        p.add_argument(flag, type=type(default), default=default, help=f"default: {shown}")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if f.name not in _SETS}
    for name in _SETS:
        values[name] = () if getattr(args, f"no_{name}") else (
            tuple(getattr(args, name)) if getattr(args, name) else None)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists (pass --overwrite to replace it)")
    try:
        settings = resolve(Settings(**values))
        check_sets(model_config(Language.generate(0, settings.n_words), settings.layers,
                                settings.d_model, settings.heads, settings.d_ff), settings)
        built = build(settings)
    except (JaxpatchError, ValueError) as e:
        print(f"planted: error: {e}; nothing was written", file=sys.stderr)
        return 2
    write(built, out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
