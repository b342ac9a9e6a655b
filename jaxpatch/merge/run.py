"""Running a merge: every tensor of the models, merged as Hugging Face stores it.

Tensors are merged one at a time in Hugging Face's layout (the layout matters to the methods
that pick elements by magnitude or interpolate whole tensors), with each parameter resolved for
that tensor (`config.resolve`: gradients by block fraction `i / (n_layers - 1)`, 0 outside the
blocks; filters by tensor name), then converted back to jaxpatch's params. Memory: the input
models plus the merged one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import flatten_params, unflatten_dotted
from jaxpatch.errors import InvalidInputError, PatchError
from jaxpatch.merge import methods
from jaxpatch.merge.config import PARAMETERS, MergeConfig, resolve
from jaxpatch.merge.guided import merge_guided
from jaxpatch.models.families import tensor_rules
from jaxpatch.models.model import Model
from jaxpatch.patch import check_compatible

__all__ = ["block_fraction", "merge_tensor", "merge_models", "merge_models_in_memory"]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
# How each method of mergekit's generalized task arithmetic sparsifies its deltas.
SPARSIFY: dict[str, methods.Sparsify] = {
    "ties": "magnitude", "dare_linear": "random", "dare_ties": "random",
    "breadcrumbs": "magnitude_outliers", "breadcrumbs_ties": "magnitude_outliers"}


def block_fraction(hf_name: str, n_layers: int) -> float:
    """Where a tensor sits for gradient parameters: `i / (n_layers - 1)` in block i (1 with a
    single block), 0 outside the blocks (embeddings, final norm, lm_head), as mergekit does.

    Example:
        >>> block_fraction("model.layers.2.mlp.up_proj.weight", 5), block_fraction("lm_head.weight", 5)
        (0.5, 0.0)
    """
    m = _BLOCK.search(hf_name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def merge_tensor(method: str, base: np.ndarray | None, tensors: Sequence[np.ndarray],
                 params: dict[str, Any], key: jax.Array) -> np.ndarray:
    """One tensor merged.

    Arguments:
        method: the merge method.
        base: the base model's tensor (None for linear without a base).
        tensors: the other models' tensors, in order.
        params: the resolved parameters: per-model ones (`weight`, `density`, `gamma`) as
            lists, the rest as scalars.
        key: the random key (DARE).

    Returns:
        The merged tensor.

    Example:
        >>> merge_tensor("linear", None, [np.ones(2), 3 * np.ones(2)],
        ...              {"weight": [1.0, 1.0], "normalize": True}, jax.random.key(0)).tolist()
        [2.0, 2.0]
    """
    stacked = jnp.stack([jnp.asarray(t) for t in tensors])
    if method == "linear":
        return np.asarray(methods.linear(stacked, jnp.asarray(params["weight"], jnp.float32),
                                         normalize=bool(params["normalize"])))
    assert base is not None  # checked when the configuration was parsed
    if method == "slerp":
        return np.asarray(methods.slerp(jnp.float32(params["t"]), jnp.asarray(base), stacked[0]))
    if method == "consensus_ta":
        return np.asarray(methods.consensus_ta(
            jnp.asarray(base), stacked, jnp.asarray(params["weight"], jnp.float32),
            float(params["lambda"]), float(params["mask_lambda"]), int(params["k"])))
    if method == "model_stock":
        return np.asarray(methods.model_stock(jnp.asarray(base), stacked,
                                              filter_wise=bool(params["filter_wise"])))
    sparsify = SPARSIFY.get(method)
    consensus = "sum" if method in ("ties", "dare_ties", "breadcrumbs_ties") else None
    densities = [float(d) for d in params["density"]]
    if method.startswith("breadcrumbs"):
        keeps, skips = zip(*(methods.outlier_window(d, float(g), int(base.size))
                             for d, g in zip(densities, params["gamma"])))
    else:
        keeps, skips = tuple(methods.keep_count(d, int(base.size)) for d in densities), None
    return np.asarray(methods.generalized_task_arithmetic(
        jnp.asarray(base), stacked, jnp.asarray(params["weight"], jnp.float32),
        jnp.asarray(densities, jnp.float32), jnp.asarray(keeps, jnp.int32), sparsify, consensus,
        bool(params["normalize"]), bool(params["rescale"]), float(params["lambda"]), key,
        None if skips is None else jnp.asarray(skips, jnp.int32)))


def merge_models(config: MergeConfig, *, seed: int = 0, progress: bool = False) -> Model:
    """Merges the models of a configuration (the standard methods tensor by tensor; the
    score-guided one by `jaxpatch.merge.guided`).

    Arguments:
        config: a checked configuration (`read_config`).
        seed: the seed of random sparsification (DARE); each tensor folds in its index.
        progress: show a progress bar.

    Returns:
        The merged model, with the base's tokenizer (the first model's without a base).

    Raises:
        CheckpointNotFoundError, ...: a model folder cannot be loaded.
        PatchError: a model's architecture differs from the base (naming the tensor, or the
            config field).
        InvalidInputError: a density resolves outside (0, 1] for some tensor.

    Example:
        >>> from jaxpatch.merge.config import parse_config
        >>> _ = [jaxpatch.save(m, tmp / n) for m, n in ((base, "b"), (donor, "d"))]
        >>> c = parse_config({"merge_method": "task_arithmetic", "base_model": "b",
        ...                   "models": [{"model": "d", "parameters": {"weight": 1.0}}]}, tmp)
        >>> merged = merge_models(c)
        >>> bool(np.allclose(merged.params["norm"]["weight"], donor.params["norm"]["weight"]))
        True
    """
    from jaxpatch.io import load

    others = [load(entry.path, dtype=config.dtype) for entry in config.models]
    base = load(config.base, dtype=config.dtype) if config.base is not None else None
    return merge_models_in_memory(config, base, others, seed=seed, progress=progress)


def merge_models_in_memory(config: MergeConfig, base: Model | None, others: list[Model], *,
                           seed: int = 0, progress: bool = False) -> Model:
    """`merge_models` on models already loaded (`config`'s paths only name them).

    Arguments:
        config: the configuration.
        base: the base model (None for linear without one).
        others: the models merged, in the configuration's order.
        seed, progress: as for `merge_models`.

    Returns:
        The merged model.

    Example:
        >>> import pathlib
        >>> from jaxpatch.merge.config import parse_config
        >>> c = parse_config({"merge_method": "linear", "models": [
        ...     {"model": "a", "parameters": {"weight": 1.0}},
        ...     {"model": "b", "parameters": {"weight": 1.0}}]}, pathlib.Path("."))
        >>> m = merge_models_in_memory(c, None, [base, donor])
        >>> bool(np.allclose(m.params["norm"]["weight"],
        ...                  (base.params["norm"]["weight"] + donor.params["norm"]["weight"]) / 2))
        True
    """
    reference = base if base is not None else others[0]
    reference_name = "base" if base is not None else config.models[0].path.name
    for entry, model in zip(config.models, others):
        check_compatible(reference.params, model.params, (reference_name, entry.path.name))
        different = [f.name for f in dataclasses.fields(model.config)
                     if getattr(model.config, f.name) != getattr(reference.config, f.name)]
        if different:
            raise PatchError(f"{reference_name} and {entry.path.name} differ in their config: "
                             f"{different[0]} is {getattr(reference.config, different[0])!r} and "
                             f"{getattr(model.config, different[0])!r}")
    if config.method == "weight_patching":
        assert base is not None  # checked when the configuration was parsed
        return merge_guided(config, base, others, _rest(config, base, others, seed))
    return _merge_tensors(config, base, others, seed, progress)


def _rest(config: MergeConfig, base: Model, experts: list[Model], seed: int) -> Model | None:
    """The data-free merge a score-guided merge falls back to (None: the base itself)."""
    rest = str(resolve([config.parameters], "rest", "", 0.0, "base"))
    if rest == "base":
        return None
    allowed = PARAMETERS[rest]
    models = tuple(dataclasses.replace(e, parameters={"weight": 1.0, **{
        k: v for k, v in e.parameters.items() if k in allowed}}) for e in config.models)
    shared = {k: v for k, v in config.parameters.items() if k in allowed}
    fallback = dataclasses.replace(config, method=rest, models=models, parameters=shared)  # type: ignore[arg-type]
    return _merge_tensors(fallback, base, experts, seed, False)


_UNMOVED_IS_BASE = frozenset({"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                              "breadcrumbs_ties", "model_stock", "consensus_ta"})
"""Methods that return the base's tensor exactly where no model's tensor differs from it (their
task vectors are all zero); linear and slerp average, which may round."""


def _merge_tensors(config: MergeConfig, base: Model | None, others: list[Model], seed: int,
                   progress: bool) -> Model:
    """The standard merges: every tensor in Hugging Face's layout, parameters resolved for it."""
    from tqdm.auto import tqdm

    reference = base if base is not None else others[0]
    model_config = reference.config
    flats = [flatten_params(m.params) for m in others]
    base_flat = flatten_params(base.params) if base is not None else None
    spec = PARAMETERS[config.method]
    key = jax.random.key(seed)
    merged: dict[str, Any] = {}
    rules = tensor_rules(model_config)
    for index, rule in enumerate(tqdm(rules, desc=f"merge {config.method}", disable=not progress)):
        t = block_fraction(rule.hf_name, model_config.n_layers)
        params: dict[str, Any] = {}
        for name, (scope, kind, default) in spec.items():
            sources = ([[e.parameters, config.parameters] for e in config.models]
                       if scope == "model" else [[config.parameters]])
            values = [resolve(settings, name, rule.hf_name, t, default) for settings in sources]
            if any(v is None for v in values):
                raise InvalidInputError(f"{config.source}: parameter {name!r} resolves to nothing "
                                        f"for {rule.hf_name} (no filter matches it)")
            params[name] = [kind(v) for v in values] if scope == "model" else kind(values[0])
        if "density" in params and not all(0 < d <= 1 for d in params["density"]):
            raise InvalidInputError(f"{config.source}: density resolves outside (0, 1] for "
                                    f"{rule.hf_name}: {params['density']}")
        tensors = [rule.to_hf([np.asarray(f[leaf]) for leaf in rule.leaves]) for f in flats]
        base_tensor = (rule.to_hf([np.asarray(base_flat[leaf]) for leaf in rule.leaves])
                       if base_flat is not None else None)
        if base_tensor is not None and config.method in _UNMOVED_IS_BASE and all(
                np.array_equal(x, base_tensor) for x in tensors):
            out = base_tensor  # no model moved it (a frozen embedding): each method gives the base
        else:
            out = merge_tensor(config.method, base_tensor, tensors, params,
                               jax.random.fold_in(key, index))
        merged.update(zip(rule.leaves, (jnp.asarray(x) for x in rule.to_canonical(out))))
    return Model(model_config, unflatten_dotted(merged), tokenizer=reference.tokenizer)
