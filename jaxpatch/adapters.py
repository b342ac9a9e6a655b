"""Patching params trees that jaxpatch did not build: Flax Linen variables, Flax NNX models.

Any pytree can be patched with `jaxpatch.patch.apply`; these helpers build the alpha tree from a
selector over the tree's dotted leaf paths (`params.Dense_0.kernel`) and, for NNX, split and
merge the model around it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpatch._tree import flatten_params
from jaxpatch.components import Component, SelectorLike, as_selector
from jaxpatch.errors import SelectorError
from jaxpatch.patch import apply

__all__ = ["tree_patch", "linen_patch", "nnx_apply"]


def tree_patch(tree: Any, selector: SelectorLike, strength: float = 1.0) -> Any:
    """An alpha tree for any pytree: `strength` on leaves whose dotted path the selector
    matches (a path matches every leaf under it), 0 elsewhere. Each alpha is a scalar.

    Arguments:
        tree: the params pytree (nested dicts and lists).
        selector: a selector over dotted leaf paths, e.g. `"params.Dense_1"`.
        strength: the coefficient of the selected leaves.

    Returns:
        An alpha tree of the same structure, for `jaxpatch.patch.apply`.

    Raises:
        SelectorError: the selector matches no leaf.

    Example:
        >>> alpha = tree_patch({"a": {"w": jnp.ones(2)}, "b": jnp.ones(3)}, "a")
        >>> float(alpha["a"]["w"]), float(alpha["b"])
        (1.0, 0.0)
    """
    sel = as_selector(selector)
    names = list(flatten_params(tree))
    chosen = [sel.matches(Component(n, "module", tuple(n.split(".")), None, None, 0)) for n in names]
    if not any(chosen):
        raise SelectorError(f"selector {str(sel)!r} matches no leaf (leaves: {', '.join(names[:8])}"
                            + (", ..." if len(names) > 8 else "") + ")")
    treedef = jax.tree_util.tree_structure(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(strength if c else 0.0, jnp.float32) for c in chosen])


def linen_patch(variables: Any, selector: SelectorLike, strength: float = 1.0) -> Any:
    """The alpha tree for a Flax Linen variables dict (`{"params": ...}`).

    Example:
        >>> alpha = linen_patch({"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}}, "params")
        >>> float(alpha["params"]["Dense_0"]["kernel"])
        1.0
    """
    return tree_patch(variables, selector, strength)


def nnx_apply(base: Any, donor: Any, selector: SelectorLike, strength: float = 1.0) -> Any:
    """A new Flax NNX model: `base` with the selected parameters moved towards `donor`.

    Arguments:
        base: the NNX module patched into (left unchanged).
        donor: an NNX module of the same structure, copied from.
        selector: a selector over the module's dotted parameter paths, e.g. `"second.kernel"`.
        strength: the coefficient (1 copies the donor's values).

    Returns:
        The patched NNX module.

    Example:
        >>> from flax import nnx
        >>> class Net(nnx.Module):
        ...     def __init__(self, rngs: nnx.Rngs) -> None:
        ...         self.first = nnx.Linear(4, 8, rngs=rngs)
        ...         self.second = nnx.Linear(8, 2, rngs=rngs)
        >>> base_net, donor_net = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
        >>> patched = nnx_apply(base_net, donor_net, "second")
        >>> bool((patched.second.kernel[...] == donor_net.second.kernel[...]).all())
        True
        >>> bool((patched.first.kernel[...] == base_net.first.kernel[...]).all())
        True
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    base_dict = nnx.to_pure_dict(params)
    donor_dict = nnx.to_pure_dict(nnx.state(donor, nnx.Param))
    alpha = tree_patch(base_dict, selector, strength)
    nnx.replace_by_pure_dict(params, apply(alpha, base_dict, donor_dict))
    return nnx.merge(graphdef, params, rest)
