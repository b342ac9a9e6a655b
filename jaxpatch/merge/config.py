"""Merge configurations in mergekit's YAML, and how a parameter resolves for one tensor.

A configuration names `merge_method`, `base_model`, `models` (each with optional
`parameters`), top-level `parameters` and `dtype`, as mergekit does. A parameter is a scalar,
a list of numbers (a gradient: interpolated across the blocks, the first value for tensors
outside them), or a list of `{filter, value}` entries (the first whose filter is a substring of
the tensor's name, `*` or no filter matching all). Per-model parameters take precedence over
top-level ones. `slices` and `modules` are refused by name. Model paths are read relative to the
configuration file's folder.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, get_args

from jaxpatch.errors import InvalidInputError

__all__ = ["MergeMethod", "MERGE_METHODS", "PARAMETERS", "CHOICES", "ModelEntry", "MergeConfig",
           "parse_config", "read_config", "resolve"]

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                      "breadcrumbs", "breadcrumbs_ties", "model_stock", "consensus_ta", "slerp",
                      "weight_patching"]
MERGE_METHODS: tuple[MergeMethod, ...] = get_args(MergeMethod)

_TASK = {"weight": ("model", float, None), "density": ("model", float, 1.0),
         "lambda": ("shared", float, 1.0), "int8_mask": ("shared", bool, False)}
PARAMETERS: dict[str, dict[str, tuple[str, type, Any]]] = {
    "linear": {"weight": ("model", float, None), "normalize": ("shared", bool, True)},
    "task_arithmetic": {**_TASK, "normalize": ("shared", bool, False),
                        "rescale": ("shared", bool, False)},
    "ties": {**_TASK, "normalize": ("shared", bool, True), "rescale": ("shared", bool, False)},
    "dare_linear": {**_TASK, "normalize": ("shared", bool, False), "rescale": ("shared", bool, True)},
    "dare_ties": {**_TASK, "normalize": ("shared", bool, False), "rescale": ("shared", bool, True)},
    "breadcrumbs": {**_TASK, "gamma": ("model", float, 0.01), "normalize": ("shared", bool, False),
                    "rescale": ("shared", bool, False)},
    "breadcrumbs_ties": {**_TASK, "gamma": ("model", float, 0.01),
                         "normalize": ("shared", bool, False), "rescale": ("shared", bool, False)},
    "model_stock": {"filter_wise": ("shared", bool, False)},
    "consensus_ta": {"weight": ("model", float, 1.0), "lambda": ("shared", float, 1.0),
                     "mask_lambda": ("shared", float, 0.4), "k": ("shared", int, 2)},
    "slerp": {"t": ("shared", float, None)},
    # Score-guided (jaxpatch.merge.guided): each model's scores file, the selection threshold,
    # how conflicts resolve, and the data-free method (with its own parameters) for the rest.
    "weight_patching": {"scores": ("model", str, None), "weight": ("model", float, 1.0),
                        "threshold": ("shared", float, 0.1), "conflict": ("shared", str, "winner"),
                        "rest": ("shared", str, "base"), "density": ("model", float, 1.0),
                        "lambda": ("shared", float, 1.0), "normalize": ("shared", bool, False),
                        "rescale": ("shared", bool, False), "int8_mask": ("shared", bool, False)},
}
"""Each method's parameters: name -> (scope, type, default); scope "model" is set per model
(or at the top level for all), "shared" only at the top level; a None default is required."""

CHOICES = {"conflict": ("winner", "score_weighted", "source_set"),
           "rest": ("base", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                    "breadcrumbs_ties")}
"""The allowed values of the string parameters."""

_TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
              "tokenizer_source"}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model of a merge and its own parameter settings."""

    path: Path
    parameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A parsed, checked merge configuration.

    Attributes:
        method: the merge method.
        base: the base model's folder (None for linear without one).
        models: the models merged (the base excluded), in order.
        parameters: top-level parameter settings.
        dtype: the dtype tensors are merged and written in (None: the base's).
        source: the file it was read from.
    """

    method: MergeMethod
    base: Path | None
    models: tuple[ModelEntry, ...]
    parameters: dict[str, Any]
    dtype: str | None
    source: str


def read_config(path: str | Path) -> MergeConfig:
    """Reads and checks a mergekit YAML file.

    Raises:
        InvalidInputError: the file is missing, not YAML, or not a valid configuration (one
            line naming the key or value at fault).

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.yml"
        >>> _ = f.write_text("merge_method: ties\\nbase_model: b\\nmodels:\\n  - model: e\\n"
        ...                  "    parameters: {weight: 1, density: 0.5}\\n")
        >>> c = read_config(f)
        >>> c.method, c.base.name, [m.path.name for m in c.models]
        ('ties', 'b', ['e'])
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: merge configuration not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise InvalidInputError(f"{path}{where}: not YAML ({problem})") from None
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path}: not YAML ({type(e).__name__})") from None
    except RecursionError:
        raise InvalidInputError(f"{path}: the YAML nests too deeply") from None
    return parse_config(raw, path.parent, str(path))


def parse_config(raw: Any, folder: Path, source: str = "config") -> MergeConfig:
    """Checks a configuration already read from YAML (see `read_config`).

    Example:
        >>> c = parse_config({"merge_method": "slerp", "base_model": "a",
        ...                   "models": [{"model": "a"}, {"model": "b"}],
        ...                   "parameters": {"t": [0, 1]}}, Path("."))
        >>> [m.path.name for m in c.models], c.parameters
        (['b'], {'t': [0, 1]})
    """
    def fail(message: str) -> InvalidInputError:
        return InvalidInputError(f"{source}: {message}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping with merge_method, base_model and models")
    for key in ("slices", "modules"):
        if key in raw:
            raise fail(f"`{key}` is not supported: merge whole models with `models`")
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (valid: {', '.join(sorted(_TOP_LEVEL))})")
    method = raw.get("merge_method")
    if method not in MERGE_METHODS:
        raise fail(f"unknown merge_method {method!r} (valid: {', '.join(MERGE_METHODS)})")
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise fail(f"unknown dtype {dtype!r} (valid: {', '.join(_DTYPES)})")
    base = raw.get("base_model")
    base_path = None if base is None else folder / str(base)
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise fail("`models` must be a non-empty list of {model: ..., parameters: ...}")
    models = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise fail(f"models[{i}] must be a mapping with a `model` key")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise fail(f"models[{i}].parameters must be a mapping")
        path = folder / str(entry["model"])
        if base_path is not None and path == base_path:
            continue  # mergekit lists the base among the models; it is not merged as one
        _check_parameters(method, params, "model", f"models[{i}]", fail)
        if isinstance(params.get("scores"), str):  # a file, read relative to the configuration
            params = {**params, "scores": str(folder / params["scores"])}
        models.append(ModelEntry(path, dict(params)))
    top = raw.get("parameters") or {}
    if not isinstance(top, dict):
        raise fail("`parameters` must be a mapping")
    _check_parameters(method, top, "top", "parameters", fail)
    if method != "linear" and base_path is None:
        raise fail(f"{method} needs a base_model")
    if method == "slerp" and len(models) != 1:
        raise fail(f"slerp merges the base with exactly one other model, got {len(models)}")
    if method in ("model_stock", "consensus_ta") and len(models) < 2:
        raise fail(f"{method} merges at least two models besides the base, got {len(models)}")
    for name, (scope, _, default) in PARAMETERS[method].items():
        if default is None:
            missing = [m.path.name for m in models if name not in m.parameters and name not in top] \
                if scope == "model" else ([] if name in top else ["(top level)"])
            if missing:
                raise fail(f"parameter {name!r} of {method} is required ({missing[0]} has none)")
    return MergeConfig(method, base_path, tuple(models), dict(top), dtype, source)


def _check_parameters(method: str, params: dict[str, Any], where: str, label: str,
                      fail: Any) -> None:
    """Refuses unknown parameters, values that do not parse, densities outside (0, 1]."""
    allowed = PARAMETERS[method]
    for name, setting in params.items():
        if name not in allowed:
            raise fail(f"{label}: unknown parameter {name!r} for {method} "
                       f"(valid: {', '.join(allowed)})")
        scope, kind, _ = allowed[name]
        if where == "model" and scope == "shared":
            raise fail(f"{label}: {name!r} is set for the whole merge, under top-level parameters")
        for value in _scalars(setting, f"{label}.{name}", fail):
            checked = _as(kind, value, f"{label}.{name}", fail)
            if name in CHOICES and checked not in CHOICES[name]:
                raise fail(f"{label}.{name} must be one of {', '.join(CHOICES[name])}, "
                           f"got {value!r}")
            if name == "density" and not 0 < checked <= 1:
                raise fail(f"{label}.density must be in (0, 1], got {value!r}")


def _scalars(setting: Any, label: str, fail: Any) -> list[Any]:
    """Every scalar a setting can resolve to."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise fail(f"{label}: an empty list")
        out: list[Any] = []
        for item in setting:
            if isinstance(item, dict):
                if "value" not in item or set(item) - {"value", "filter"}:
                    raise fail(f"{label}: a filtered entry is {{filter: ..., value: ...}}")
                out += _scalars(item["value"], label, fail)
            elif isinstance(item, list):
                raise fail(f"{label}: lists do not nest")
            else:
                out.append(item)
        return out
    return [setting]


def _as(kind: type, value: Any, label: str, fail: Any) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise fail(f"{label} must be a string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise fail(f"{label} must be true or false, got {value!r}")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise fail(f"{label} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise fail(f"{label} must be a finite number, got {value!r}")
    if kind is int and (not number.is_integer() or number < 0):
        raise fail(f"{label} must be a whole number of at least 0, got {value!r}")
    return number


def resolve(settings: list[dict[str, Any]], name: str, tensor: str, t: float,
            default: Any) -> Any:
    """A parameter's value for one tensor: the first of `settings` (highest precedence first)
    that sets it, resolved for `tensor` at block fraction `t` (mergekit's rule).

    Example:
        >>> resolve([{"weight": [0.0, 1.0]}], "weight", "model.layers.1.mlp.up_proj.weight", 0.25, None)
        0.25
        >>> resolve([{"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.9}]}], "density",
        ...         "model.layers.0.self_attn.q_proj.weight", 0.0, 1.0)
        0.9
    """
    for setting in settings:
        if name in setting:
            value = _evaluate(setting[name], tensor, t)
            if value is not None:
                return value
    return default


def _evaluate(setting: Any, tensor: str, t: float) -> Any:
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(e, dict) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
    for entry in setting:
        match = entry.get("filter")
        if match is None or match == "*" or match in tensor:
            return _evaluate(entry["value"], tensor, t)
    return None
