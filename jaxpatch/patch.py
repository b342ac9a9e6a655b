"""Patches as data: a pytree of coefficients alpha, and `apply` as a jitted tree-merge.

The patched params are `start + alpha * (target - start)` leaf by leaf. Each alpha leaf has the
rank of its param and size 1 on every axis except the one components index:

    q_proj/k_proj/v_proj weight `[1, heads, 1]`, bias `[heads, 1]`   (head axis)
    o_proj weight `[heads, 1, 1]`, bias `[1]`                        (head axis; the bias is
                                                                      the module's, not a head's)
    gate_proj/up_proj weight `[1, d_ff]`, bias `[d_ff]`               (neuron axis)
    down_proj weight `[d_ff, 1]`, bias `[1]`
    norms, embeddings, lm_head: all ones-shaped                       (modules only)

So one alpha tree expresses module, head and neuron patches, many candidates are a leading axis,
and `jax.grad` with respect to alpha gives per-component first-order effects.

Directions: denoise patches donor weights into the base (`apply(patch, base, donor)`: is the
component sufficient?); noise patches base weights into the donor (`apply(patch, donor, base)`:
is it necessary?); ablation patches towards zero or towards the mean over reference models
(`ablation_target`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch._tree import flatten_params, unflatten_dotted
from jaxpatch.components import Component, SelectorLike, select
from jaxpatch.errors import PatchError
from jaxpatch.models.config import ModelConfig, Params, param_shapes
from jaxpatch.modes import Granularity
from jaxpatch.rounding import jit

__all__ = ["PATCH_FORMAT", "Index", "alpha_shapes", "component_entries", "indexed_leaves", "Patch",
           "mix_leaf", "apply", "check_compatible", "ablation_target"]

PATCH_FORMAT = "jaxpatch.patch/1"
_MAX_PATCH_LEAF = 2**31  # elements: more than any weight matrix of the models jaxpatch loads
Index = tuple  # an index into an alpha leaf: ints and slices


# ----------------------------------------------------------------------------- alpha layout

def _alpha_axis(name: str) -> int | None:
    """Which axis of a param leaf carries per-component coefficients, if any."""
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "layers":
        return None
    module, leaf = parts[-2], parts[-1]
    if module in ("q_proj", "k_proj", "v_proj"):
        return 1 if leaf == "weight" else 0
    if module == "o_proj":
        return 0 if leaf == "weight" else None
    if module in ("gate_proj", "up_proj"):
        return 1 if leaf == "weight" else 0
    if module == "down_proj":
        return 0 if leaf == "weight" else None
    return None


@functools.lru_cache(maxsize=32)
def _alpha_layout(config: ModelConfig) -> tuple[tuple[str, tuple[int, ...], int | None], ...]:
    """(leaf name, alpha shape, component axis) for every param leaf, in params order."""
    out = []
    for name, spec in flatten_params(param_shapes(config)).items():
        axis = _alpha_axis(name)
        out.append((name, tuple(n if i == axis else 1 for i, n in enumerate(spec.shape)), axis))
    return tuple(out)


def alpha_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every alpha leaf, by dotted param name, in params order.

    Example:
        >>> alpha_shapes(ModelConfig.tiny("llama"))["layers.0.self_attn.k_proj.weight"]
        (1, 2, 1)
    """
    return {name: shape for name, shape, _ in _alpha_layout(config)}


@functools.lru_cache(maxsize=4096)
def _leaves_under(config: ModelConfig, prefix: str) -> tuple[tuple[str, int | None], ...]:
    return tuple((name, axis) for name, _, axis in _alpha_layout(config) if name.startswith(prefix))


def component_entries(config: ModelConfig, component: Component) -> dict[str, Index]:
    """Which alpha entries a component sets: leaf name -> index into the alpha leaf.

    Example:
        >>> from jaxpatch.components import components
        >>> head = components(ModelConfig.tiny("llama"), "head")[1]
        >>> sorted(component_entries(ModelConfig.tiny("llama"), head))
        ['layers.0.self_attn.o_proj.weight', 'layers.0.self_attn.q_proj.weight']
    """
    everything = (slice(None),)
    if component.granularity in ("module", "layer"):
        return {name: everything for name, _ in _leaves_under(config, component.name + ".")}
    return {name: (slice(None),) * axis + (component.index,)
            for name, axis in indexed_leaves(config, component.path, component.key)}


_PROJECTIONS = {"head": ("q_proj", "o_proj"), "kv_head": ("k_proj", "v_proj"),
                "neuron": ("gate_proj", "up_proj", "down_proj")}


@functools.lru_cache(maxsize=4096)
def indexed_leaves(config: ModelConfig, path: tuple[str, ...], key: str) -> tuple[tuple[str, int], ...]:
    """The alpha leaves that the indexed components (heads, kv heads, neurons) of one module
    set, with the axis that the index runs along.

    Arguments:
        config: the architecture.
        path: the module's path segments, e.g. `("layers", "0", "mlp")`.
        key: "head", "kv_head" or "neuron".

    Returns:
        (leaf name, axis) pairs in params order.

    Example:
        >>> indexed_leaves(ModelConfig.tiny("llama"), ("layers", "0", "mlp"), "neuron")[0]
        ('layers.0.mlp.down_proj.weight', 0)
    """
    return tuple((name, axis) for name, axis in _leaves_under(config, ".".join(path) + ".")
                 if axis is not None and name.split(".")[-2] in _PROJECTIONS[key])


# ------------------------------------------------------------------------------------ Patch

@dataclasses.dataclass(frozen=True)
class Patch:
    """A pytree of coefficients, shaped like the params (see the module docstring).

    Attributes:
        alpha: the coefficient tree (same structure as the params).
        label: a human description, e.g. the selector it was built from. It is not part of
            the pytree, so patches with different labels stack and vmap together (and
            tree transformations return unlabelled patches).

    Example:
        >>> cfg = ModelConfig.tiny("llama")
        >>> p = Patch.from_selector(cfg, "layers.1.mlp[neuron=3]", "neuron")
        >>> float(p.alpha["layers"][1]["mlp"]["down_proj"]["weight"][3, 0])
        1.0
    """

    alpha: Params
    label: str = ""

    # ------------------------------------------------------------------ construction

    @classmethod
    def zeros(cls, config: ModelConfig) -> Patch:
        """The empty patch (all coefficients 0)."""
        return cls(_unflatten(config, {n: np.zeros(s, np.float32)
                                       for n, s in alpha_shapes(config).items()}), "nothing")

    @classmethod
    def from_components(cls, config: ModelConfig, items: Iterable[Component],
                        strength: float = 1.0, label: str | None = None) -> Patch:
        """A patch setting the coefficients of the given components to `strength`.

        Example:
            >>> from jaxpatch.components import components
            >>> cfg = ModelConfig.tiny("gpt2")
            >>> Patch.from_components(cfg, components(cfg, "layer")[:1]).label
            'layers.0'
        """
        items = list(items)
        flat = {n: np.zeros(s, np.float32) for n, s in alpha_shapes(config).items()}
        for component in items:
            for name, index in component_entries(config, component).items():
                flat[name][index] = strength
        text = label if label is not None else " | ".join(c.name for c in items)
        return cls(_unflatten(config, flat), text)

    @classmethod
    def from_selector(cls, config: ModelConfig, selector: SelectorLike, granularity: Granularity = "module",
                      strength: float = 1.0) -> Patch:
        """A patch of every component a selector matches at a granularity.

        Example:
            >>> cfg = ModelConfig.tiny("llama")
            >>> p = Patch.from_selector(cfg, "layers.*.self_attn[head=0]", "head")
            >>> p.num_nonzero()  # q and o coefficients of head 0 in each of 2 blocks
            4
        """
        return cls.from_components(config, select(config, selector, granularity), strength,
                                   label=str(selector) if not isinstance(selector, list)
                                   else " | ".join(selector))

    # ---------------------------------------------------------------------- algebra

    def _combine(self, other: Patch, fn: Any, label: str) -> Patch:
        _check_same_structure(self, other)
        return Patch(jax.tree_util.tree_map(fn, self.alpha, other.alpha), label)

    def union(self, other: Patch) -> Patch:
        """Elementwise maximum: every coefficient either patch sets."""
        return self._combine(other, jnp.maximum, f"({self.label}) | ({other.label})")

    def intersection(self, other: Patch) -> Patch:
        """Elementwise minimum: the coefficients both patches set."""
        return self._combine(other, jnp.minimum, f"({self.label}) & ({other.label})")

    def then(self, other: Patch) -> Patch:
        """Applying `self` and then `other` towards the same target: `a + b - a * b`.

        Example:
            >>> cfg = ModelConfig.tiny("gpt2")
            >>> half = Patch.from_selector(cfg, "norm").scale(0.5)
            >>> float(half.then(half).alpha["norm"]["weight"][0])
            0.75
        """
        return self._combine(other, lambda a, b: a + b - a * b, f"({self.label}) ; ({other.label})")

    def complement(self) -> Patch:
        """`1 - alpha`: everything the patch does not set."""
        return Patch(jax.tree_util.tree_map(lambda a: 1 - a, self.alpha), f"~({self.label})")

    def scale(self, strength: float) -> Patch:
        """The patch at partial strength (`alpha * strength`)."""
        return Patch(jax.tree_util.tree_map(lambda a: a * strength, self.alpha),
                     f"{strength:g} * ({self.label})")

    __or__ = union
    __and__ = intersection
    __invert__ = complement

    def num_nonzero(self) -> int:
        """How many coefficients are nonzero."""
        return int(sum(np.count_nonzero(np.asarray(a)) for a in jax.tree_util.tree_leaves(self.alpha)))

    # ---------------------------------------------------------------- serialization

    def to_json(self) -> str:
        """The patch as JSON: its label, every alpha leaf's shape, and its nonzero entries.

        Example:
            >>> cfg = ModelConfig.tiny("gpt2")
            >>> p = Patch.from_selector(cfg, "norm")
            >>> Patch.from_json(p.to_json()).num_nonzero()
            2
        """
        leaves = {}
        for name, a in flatten_params(self.alpha).items():
            a = np.asarray(a, np.float32)
            nz = np.nonzero(a)
            leaves[name] = {"shape": list(a.shape),
                            "indices": np.stack(nz, -1).tolist() if a.ndim else ([[]] if a else []),
                            "values": a[nz].tolist()}
        return json.dumps({"format": PATCH_FORMAT, "label": self.label, "alpha": leaves})

    @classmethod
    def from_json(cls, text: str, source: str = "patch") -> Patch:
        """Rebuilds a patch from `to_json` output (never unpickles)."""
        try:
            data = json.loads(text)
            if data.get("format") != PATCH_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {PATCH_FORMAT!r}")
            flat = {}
            for name, leaf in data["alpha"].items():
                shape = leaf["shape"]
                if not (isinstance(shape, list) and all(
                        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                        and math.prod(shape) <= _MAX_PATCH_LEAF):
                    raise ValueError(f"leaf {name!r} has an impossible shape {str(shape)[:40]}")
                a = np.zeros(shape, np.float32)
                for index, value in zip(leaf["indices"], leaf["values"]):
                    a[tuple(index)] = value
                flat[name] = a
            return cls(unflatten_dotted(flat), data.get("label", ""))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
            raise PatchError(f"{source}: not a jaxpatch patch ({e})") from None


jax.tree_util.register_pytree_with_keys(
    Patch,
    lambda p: (((jax.tree_util.GetAttrKey("alpha"), p.alpha),), None),
    lambda _, children: Patch(*children),
    flatten_func=lambda p: ((p.alpha,), None),
)


def _unflatten(config: ModelConfig, flat: dict[str, Any]) -> Params:
    treedef = jax.tree_util.tree_structure(param_shapes(config))
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[n]) for n in alpha_shapes(config)])


def _check_same_structure(a: Patch, b: Patch) -> None:
    if jax.tree_util.tree_structure(a.alpha) != jax.tree_util.tree_structure(b.alpha):
        raise PatchError(f"patches {a.label!r} and {b.label!r} are for different params trees")


# ------------------------------------------------------------------------------------ apply

def mix_leaf(alpha: jax.Array | float, start: jax.Array, target: jax.Array) -> jax.Array:
    """One patched leaf: `start + alpha * (target - start)`, computed as
    `(1 - alpha) * start + alpha * target` so it is exact at alpha = 0 and alpha = 1.

    Arguments:
        alpha: coefficients broadcastable to the leaf (or one number).
        start, target: the leaf in the model patched into and the model copied from.

    Returns:
        The mixed leaf, in the start's dtype.

    Example:
        >>> mix_leaf(0.25, jnp.zeros(2), jnp.ones(2)).tolist()
        [0.25, 0.25]
    """
    alpha = jnp.asarray(alpha).astype(start.dtype)
    return (1 - alpha) * start + alpha * target


@jit
def apply(patch: Patch | Params, start: Params, target: Params) -> Params:
    """Patched params `start + alpha * (target - start)`, leaf by leaf (jitted).

    Works on any params pytree: the built-in models, a Flax Linen `params` dict, the state of
    a Flax NNX model (see `jaxpatch.adapters`). Alpha leaves broadcast against their params.
    Safe under `jax.vmap` (many patches as a leading axis) and `jax.grad` (with respect to alpha).

    Arguments:
        patch: a `Patch` or a bare alpha tree of the same structure as the params.
        start: the params patched into (the base, for denoising).
        target: the params copied from (the donor, for denoising).

    Returns:
        The patched params.

    Example:
        >>> import jax
        >>> cfg = ModelConfig.tiny("llama")
        >>> from jaxpatch.models.config import init_params
        >>> base, donor = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
        >>> out = apply(Patch.from_selector(cfg, "norm"), base, donor)
        >>> bool((out["norm"]["weight"] == donor["norm"]["weight"]).all())
        True
    """
    alpha = patch.alpha if isinstance(patch, Patch) else patch
    return jax.tree_util.tree_map(mix_leaf, alpha, start, target)


def check_compatible(a: Params, b: Params, names: tuple[str, str] = ("base", "donor")) -> None:
    """Refuses two params trees that are not the same architecture and shapes.

    Raises:
        PatchError: naming the first tensor that differs, with both shapes.

    Example:
        >>> check_compatible({"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    """
    fa, fb = flatten_params(a), flatten_params(b)
    for name in dict.fromkeys([*fa, *fb]):
        if name not in fa or name not in fb:
            missing = names[0] if name not in fa else names[1]
            raise PatchError(f"{names[0]} and {names[1]} differ: tensor {name!r} is missing from "
                             f"the {missing}")
        if np.shape(fa[name]) != np.shape(fb[name]):
            raise PatchError(f"{names[0]} and {names[1]} differ: tensor {name!r} has shape "
                             f"{tuple(np.shape(fa[name]))} in the {names[0]} and "
                             f"{tuple(np.shape(fb[name]))} in the {names[1]}")


def ablation_target(params: Params, kind: str = "zero",
                    references: Sequence[Params] | None = None) -> Params:
    """The params an ablation patches towards: zeros, or the mean over reference models.

    Arguments:
        params: the model being ablated (for shapes and dtypes).
        kind: "zero" or "mean".
        references: for "mean", the params of the reference models (same shapes).

    Returns:
        A params tree to use as the patch target.

    Example:
        >>> ablation_target({"w": jnp.ones(2)})["w"].tolist()
        [0.0, 0.0]
    """
    if kind == "zero":
        return jax.tree_util.tree_map(jnp.zeros_like, params)
    if kind != "mean":
        raise PatchError(f"ablation kind must be 'zero' or 'mean', got {kind!r}")
    if not references:
        raise PatchError("mean ablation needs at least one reference model")
    for i, ref in enumerate(references):
        check_compatible(params, ref, ("model", f"reference {i}"))
    def mean(leaf: jax.Array, *xs: jax.Array) -> jax.Array:
        total = sum((x.astype(jnp.float32) for x in xs[1:]), xs[0].astype(jnp.float32))
        return (total / len(xs)).astype(leaf.dtype)

    return jax.tree_util.tree_map(mean, params, *references)
