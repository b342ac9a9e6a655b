"""Tree helpers: dotted leaf names, leaf replacement, and the params outside the blocks.

Every params-shaped tree in jaxpatch (params, coefficient trees, gradients) is nested dicts and
lists; a leaf is named by its dotted path, e.g. `layers.3.self_attn.q_proj.weight`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

__all__ = ["flatten_params", "unflatten_dotted", "replace_leaves", "without_layers"]


def flatten_params(params: Any) -> dict[str, Any]:
    """Flattens a params pytree into dotted names (`layers.3.self_attn.q_proj.weight`).

    Arguments:
        params: a params pytree (nested dicts and lists).

    Returns:
        An insertion-ordered dict from dotted name to leaf, in the tree's leaf order.

    Example:
        >>> flatten_params({"layers": [{"mlp": {"w": 1}}]})
        {'layers.0.mlp.w': 1}
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_dotted(path): leaf for path, leaf in flat}


def _dotted(path: tuple) -> str:
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        else:
            parts.append(str(p))
    return ".".join(parts)


def unflatten_dotted(flat: Mapping[str, Any]) -> Any:
    """Rebuilds nested dicts (and lists, where keys are 0..n-1) from dotted names: the inverse
    of `flatten_params`, leaves as jax arrays.

    Arguments:
        flat: dotted name -> leaf.

    Returns:
        The nested tree.

    Example:
        >>> tree = unflatten_dotted({"layers.0.w": 1, "layers.1.w": 2, "norm.w": 3})
        >>> len(tree["layers"]), int(tree["layers"][1]["w"]), sorted(tree)
        (2, 2, ['layers', 'norm'])
    """
    root: dict = {}
    for name, value in flat.items():
        node = root
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = jnp.asarray(value)

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node) and sorted(map(int, node)) == list(range(len(node))):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)


def replace_leaves(tree: Any, replacements: Mapping[str, Any]) -> Any:
    """The tree with the leaves named in `replacements` (dotted names) swapped for new values;
    a replacement may itself be a pytree (e.g. a `MixedWeight`).

    Arguments:
        tree: a params pytree.
        replacements: dotted leaf name -> new value.

    Returns:
        A new tree; `tree` is not modified.

    Example:
        >>> replace_leaves({"a": {"w": 1}, "b": {"w": 2}}, {"b.w": 5})
        {'a': {'w': 1}, 'b': {'w': 5}}
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    names = flatten_params(tree)
    return jax.tree_util.tree_unflatten(treedef, [replacements.get(n, leaf)
                                                  for n, leaf in zip(names, leaves)])


def without_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The params outside the blocks (embeddings, final norm, lm_head): every top-level entry
    but `layers`.

    Example:
        >>> sorted(without_layers({"layers": [], "norm": 1, "embed_tokens": 2}))
        ['embed_tokens', 'norm']
    """
    return {name: value for name, value in tree.items() if name != "layers"}
