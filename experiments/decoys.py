"""Function-preserving decoys: weight changes that leave a model's function exactly as it was.

The weight-difference baseline (|dW|: rank components by how far their weights moved) measures
how weights are parameterized, not what the model does. These rewrites move weights a long way
without changing a single logit (up to float rounding), so a component outside the planted set
can look like a large change to |dW| while weight patching sees that it does nothing:

- **neurons** of a gated MLP (`down(act(gate(h)) * up(h))`): column n of `up_proj` (and its
  bias) times c, row n of `down_proj` times 1/c. `up` enters the product linearly, so the
  neuron's contribution is unchanged. Not for ungated MLPs, whose activation is applied to `up`.
- **values** of a key/value head g: head g of `v_proj` (and its bias) times c, the rows of
  `o_proj` that read every query head sharing g times 1/c. Attention output is linear in v.
- **queries** of a key/value head g: every query head sharing g (weights and bias) times c,
  head g of `k_proj` (and its bias) times 1/c. Rotary embeddings are rotations, so `q . k` is
  unchanged.

Rewriting a donor's components outside the planted set this way changes |dW| there and not the
donor's behavior. A patch that moves a rewritten pair together (a neuron: its up column and down
row; a key/value head with its query heads) sees the same model as before; a patch of one module
of the pair alone (`up_proj` without `down_proj`) does not, so module-level scores can move too:
the planted benchmark measures by how much.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.components import select
from jaxpatch.errors import JaxpatchError, SelectorError
from jaxpatch.models.config import ModelConfig, Params

__all__ = ["AttentionPart", "rescale"]

AttentionPart = Literal["values", "queries"]


def rescale(config: ModelConfig, params: Params, selector: str, factor: float,
            attention: AttentionPart = "values") -> Params:
    """A copy of `params` with a function-preserving rescaling of the selected neurons and
    key/value heads (see the module docstring).

    Arguments:
        config: the architecture.
        params: the model's params (left unchanged).
        selector: neurons (`layers.2.mlp[neuron=64-127]`) and/or key/value heads
            (`layers.0.self_attn[kv_head=1]`); both granularities are read from it.
        factor: c, nonzero.
        attention: rescale a key/value head's "values" (v against o) or "queries" (q against k).

    Returns:
        The rewritten params, same dtypes; logits equal the original's up to float rounding.

    Raises:
        JaxpatchError: the factor is zero, the MLP is not gated, queries are rescaled in a model
            with query/key norms, or the selector names no neuron or key/value head.

    Example:
        >>> import jax, jax.numpy as jnp, jaxpatch
        >>> cfg = jaxpatch.ModelConfig.tiny("llama")
        >>> p = jaxpatch.init_params(cfg, jax.random.key(0), scale=0.2)
        >>> q = rescale(cfg, p, "layers.1.mlp[neuron=0-7] | layers.0.self_attn[kv_head=1]", 8.0)
        >>> tokens = jnp.array([[1, 2, 3, 4]])
        >>> a, b = (jaxpatch.forward(cfg, x, tokens).read(None) for x in (p, q))
        >>> bool(jnp.allclose(a, b, atol=1e-5))
        True
    """
    if factor == 0 or not np.isfinite(factor):
        raise JaxpatchError(f"a rescaling factor must be finite and nonzero, got {factor}")
    neurons = _indices(config, selector, "neuron", "neuron")
    kv_heads = _indices(config, selector, "head", "kv_head")
    if not neurons and not kv_heads:
        raise JaxpatchError(f"decoy {selector!r} names no MLP neuron or key/value head")
    if kv_heads and attention == "queries" and config.qk_norm is not None:
        raise JaxpatchError(f"decoy {selector!r}: {config.family} normalizes queries and keys "
                            "(q_norm, k_norm), which undo a rescaling of q against k only up to "
                            "the norm's epsilon; rescale the values instead")
    if neurons and not config.gated_mlp:
        raise JaxpatchError(f"decoy {selector!r}: neurons keep their function under rescaling only "
                            f"in a gated MLP; {config.family} applies its activation to up_proj")
    out = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), params)
    for layer, index in neurons.items():
        mlp = out["layers"][layer]["mlp"]
        _scale(mlp["up_proj"], (slice(None), index), (index,), factor)
        _scale(mlp["down_proj"], (index, slice(None)), None, 1 / factor)
    group = config.queries_per_kv_head
    for layer, index in kv_heads.items():
        attn = out["layers"][layer]["self_attn"]
        queries = np.concatenate([np.arange(g * group, (g + 1) * group) for g in index])
        if attention == "values":
            _scale(attn["v_proj"], (slice(None), index), (index,), factor)
            _scale(attn["o_proj"], (queries,), None, 1 / factor)  # o_proj's bias is the module's
        else:
            _scale(attn["q_proj"], (slice(None), queries), (queries,), factor)
            _scale(attn["k_proj"], (slice(None), index), (index,), 1 / factor)
    return jax.tree_util.tree_map(jnp.asarray, out)


def _indices(config: ModelConfig, selector: str, granularity: Literal["head", "neuron"],
             key: str) -> dict[int, np.ndarray]:
    """Per block, the indices of the selector's components with this index key."""
    try:
        chosen = select(config, selector, granularity)
    except SelectorError as e:
        if "matches no component" not in str(e):
            raise
        return {}
    out: dict[int, list[int]] = {}
    for c in chosen:
        if c.key == key and c.index is not None:
            out.setdefault(c.layer, []).append(c.index)
    return {layer: np.array(sorted(set(v))) for layer, v in out.items()}


def _scale(module: dict, weight_index: tuple, bias_index: tuple | None, factor: float) -> None:
    """Multiplies part of a module's weight (and, where given, its bias) in place."""
    weight = module["weight"]
    weight[weight_index] = (weight[weight_index].astype(np.float64) * factor).astype(weight.dtype)
    if bias_index is not None and "bias" in module:
        bias = module["bias"]
        bias[bias_index] = (bias[bias_index].astype(np.float64) * factor).astype(bias.dtype)
