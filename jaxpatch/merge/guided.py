"""Score-guided merging (`merge_method: weight_patching`): each component takes the delta of the
expert whose capability it carries, by the expert's own localization scores.

Each expert comes with a `scores.json` (a `SweepResult` written by `jaxpatch sweep`,
`attribute`, `localize` or the demo: one effect per module, head or neuron) computed on the
pair (this base, that expert): a component *carries* an expert's capability when its effect
there reaches `threshold`. Per coefficient of the patch layout (`jaxpatch.patch`):

    carried by one expert    base + weight * that expert's delta
    carried by several       conflict "winner": the expert with the largest effect takes it;
                             "score_weighted": their deltas averaged with their effects as
                             weights (times their `weight`); "source_set": each expert's
                             source set (every component it carries) is a unit, and a
                             contested coefficient goes to the expert whose whole set carries
                             the most (the sum of its effects over the set), so no set is
                             split between winners by its components' separate effects
    carried by none          rest "base": the base weights; or a data-free merge of all the
                             deltas there ("task_arithmetic", "ties", "dare_linear",
                             "dare_ties", with their parameters)

A scores file recorded for another base or another expert (checkpoint fingerprints) is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import flatten_params, unflatten_dotted
from jaxpatch.components import Component, components
from jaxpatch.errors import InvalidInputError
from jaxpatch.merge.config import PARAMETERS, MergeConfig, resolve
from jaxpatch.merge.methods import sum_models
from jaxpatch.models.config import ModelConfig
from jaxpatch.models.model import Model
from jaxpatch.modes import SCORED_GRANULARITIES
from jaxpatch.patch import alpha_shapes, component_entries
from jaxpatch.rounding import jit

__all__ = ["Conflict", "read_scores", "score_maps", "guided_coefficients", "source_set_priority",
           "merge_guided", "stitch"]

Conflict = Literal["winner", "score_weighted", "source_set"]


def read_scores(path: str | Path, config: ModelConfig, base: Model,
                expert: Model) -> dict[str, float]:
    """A scores file's effect per component, checked against the pair it must belong to.

    Arguments:
        path: a `scores.json` (`SweepResult.to_dict`).
        config: the architecture (its component names are checked).
        base, expert: the pair the scores must have been computed on.

    Returns:
        component name -> effect.

    Raises:
        InvalidInputError: the file is missing or malformed, names components this model does
            not have, records no fingerprints, or was computed on another base or expert.
    """
    from jaxpatch.runs.fingerprint import checkpoint_fingerprint

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = data["components"]
        effects = {str(r["name"]): float(r["effect"]) for r in rows}
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: scores file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a scores file ({type(e).__name__}: {e})") from None
    recorded = {role: (v.get("sha256") if isinstance(v, dict) else v)
                for role, v in (data.get("inputs") or {}).items() if role in ("base", "donor")}
    if set(recorded) != {"base", "donor"} or not all(recorded.values()):
        raise InvalidInputError(f"{path}: records no base and donor fingerprints, so it cannot be "
                                "checked against this merge's models")
    for role, model in (("base", base), ("donor", expert)):
        if recorded[role] != checkpoint_fingerprint(model):
            which = "the base" if role == "base" else f"the expert {Path(str(expert.source)).name}"
            raise InvalidInputError(f"{path}: computed on another {role} (fingerprint "
                                    f"{str(recorded[role])[:12]}...), not on {which}")
    known = {c.name for g in SCORED_GRANULARITIES for c in components(config, g)}
    unknown = [n for n in effects if n not in known]
    if unknown:
        raise InvalidInputError(f"{path}: names component {unknown[0]!r}, which this model does "
                                "not have")
    return effects


def score_maps(config: ModelConfig, effects: dict[str, float]) -> dict[str, np.ndarray]:
    """An expert's effects laid out as patch coefficients: per params leaf, the largest effect
    of any component covering each coefficient (-inf where none does).

    Example:
        >>> maps = score_maps(cfg, {"layers.0.mlp.down_proj": 0.7})
        >>> float(maps["layers.0.mlp.down_proj.weight"].max()), float(maps["norm.weight"].max())
        (0.7, -inf)
    """
    maps = {name: np.full(shape, -np.inf) for name, shape in alpha_shapes(config).items()}
    by_name: dict[str, Component] = {c.name: c for g in SCORED_GRANULARITIES
                                     for c in components(config, g)}
    for name, effect in effects.items():
        for leaf, index in component_entries(config, by_name[name]).items():
            maps[leaf][index] = np.maximum(maps[leaf][index], effect)
    return maps


def guided_coefficients(maps: list[np.ndarray], weights: list[float], threshold: float,
                        conflict: Conflict,
                        priority: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert coefficients of one leaf, and where any expert carries it.

    Arguments:
        maps: each expert's effect map of the leaf (`score_maps`).
        weights: each expert's `weight`.
        threshold: the effect a carrier reaches.
        conflict: "winner", "score_weighted" or "source_set".
        priority: for "source_set", each expert's rank (`source_set_priority`): the highest
            carrier takes a contested coefficient.

    Returns:
        `(coefficients [experts, *alpha shape], covered [*alpha shape])`.

    Example:
        >>> c, covered = guided_coefficients([np.array([0.5, 0.0]), np.array([0.3, 0.2])],
        ...                                  [1.0, 1.0], 0.1, "winner")
        >>> c.tolist(), covered.tolist()
        ([[1.0, 0.0], [0.0, 1.0]], [True, True])
    """
    scores = np.stack(maps)
    carries = scores >= threshold
    covered = np.asarray(carries.any(axis=0))
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (scores.ndim - 1))
    if conflict in ("winner", "source_set"):
        if conflict == "source_set":
            if priority is None:
                raise InvalidInputError("conflict source_set needs each expert's priority")
            scores = np.broadcast_to(np.asarray(priority, np.float64).reshape(w.shape),
                                     scores.shape)
        best = np.argmax(np.where(carries, scores, -np.inf), axis=0)
        chosen = (np.arange(len(maps)).reshape(w.shape) == best) & carries
        return chosen * w, covered
    share = np.where(carries, scores, 0.0)
    total = share.sum(axis=0)
    return share / np.where(total > 0, total, 1.0) * w, covered


def source_set_priority(effects: list[dict[str, float]], threshold: float) -> list[float]:
    """Each expert's rank under conflict "source_set": the sum of its effects over its source
    set (the components reaching `threshold`).

    Example:
        >>> source_set_priority([{"a": 0.5, "b": 0.05}, {"a": 0.3, "c": 0.4}], 0.1)
        [0.5, 0.7]
    """
    return [float(sum(e for e in effect.values() if e >= threshold)) for effect in effects]


def merge_guided(config: MergeConfig, base: Model, experts: list[Model],
                 rest: Model | None) -> Model:
    """The score-guided merge of a `weight_patching` configuration (scores read from each
    model's `scores` file and checked against its pair).

    Arguments:
        config: a `weight_patching` configuration.
        base, experts: the loaded models (experts in the configuration's order).
        rest: the data-free merge for coefficients no expert carries (None: the base).

    Returns:
        The merged model.
    """
    spec = PARAMETERS["weight_patching"]
    threshold = float(resolve([config.parameters], "threshold", "", 0.0, spec["threshold"][2]))
    conflict = cast(Conflict, str(resolve([config.parameters], "conflict", "", 0.0,
                                          spec["conflict"][2])))
    weights = [float(resolve([e.parameters, config.parameters], "weight", "", 0.0, 1.0))
               for e in config.models]
    effects = [read_scores(e.parameters["scores"], base.config, base, x)
               for e, x in zip(config.models, experts)]
    return stitch(base, experts, effects, weights, threshold, conflict, rest)


def stitch(base: Model, experts: list[Model], effects: list[dict[str, float]],
           weights: list[float], threshold: float, conflict: Conflict,
           rest: Model | None = None) -> Model:
    """Each coefficient from the expert(s) whose effects carry it (`guided_coefficients`), the
    rest from `rest` (default: the base).

    Arguments:
        base, experts: the models.
        effects: per expert, component name -> effect.
        weights: per expert, the scale of its delta.
        threshold, conflict: as in `guided_coefficients`.
        rest: the model the uncarried coefficients come from (None: the base).

    Returns:
        The merged model.

    Example:
        >>> merged = stitch(base, [donor], [{"layers.0.mlp.down_proj": 1.0}], [1.0], 0.5, "winner")
        >>> leaf = lambda m: m.params["layers"][0]["mlp"]["down_proj"]["weight"]
        >>> bool(jnp.allclose(leaf(merged), leaf(donor), atol=1e-6))  # base + (donor - base)
        True
    """
    model_config = base.config
    maps = [score_maps(model_config, e) for e in effects]
    priority = source_set_priority(effects, threshold)
    flat_base = flatten_params(base.params)
    flat_experts = [flatten_params(x.params) for x in experts]
    flat_rest = flatten_params(rest.params) if rest is not None else flat_base
    merged = {}
    for name, leaf in flat_base.items():
        coefficients, covered = guided_coefficients([m[name] for m in maps], weights, threshold,
                                                    conflict, priority)
        merged[name] = _mix(leaf, jnp.stack([f[name] for f in flat_experts]),
                            jnp.asarray(coefficients, jnp.float32), jnp.asarray(covered),
                            flat_rest[name])
    return dataclasses.replace(base, params=unflatten_dotted(merged), source=None)


@jit
def _mix(base: jax.Array, experts: jax.Array, coefficients: jax.Array, covered: jax.Array,
         rest: jax.Array) -> jax.Array:
    """`base + sum_e c_e (expert_e - base)` where covered, `rest` elsewhere (coefficients
    broadcast from the patch layout to the leaf)."""
    deltas = experts.astype(jnp.float32) - base.astype(jnp.float32)
    guided = base.astype(jnp.float32) + sum_models(coefficients * deltas)
    return jnp.where(covered, guided, rest.astype(jnp.float32)).astype(base.dtype)
