"""One decoder-only transformer, written as pure functions over a params pytree.

Every family (GPT-2, Llama, Qwen2/3, Mistral, Phi-3, Gemma 1/2/3, OLMo 2) runs through the same
code; the differences are fields of `ModelConfig`. The numerics follow Hugging Face
transformers' eager attention: norms computed in float32 and cast back, rotary tables computed
in float32 and cast to the activation dtype, attention softmax in float32.

All functions are safe under `jax.jit` (with the config static), `jax.vmap` and `jax.grad`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatch.errors import InvalidInputError
from jaxpatch.models.config import ModelConfig, Params, RopeScaling

__all__ = ["MixedWeight", "Probe", "dense", "at_positions", "Edit", "ForwardOutput", "forward", "embed",
           "lookup", "unembed", "block", "linear", "mixed_einsum", "probe_einsum",
           "attention_heads", "mlp", "activation", "norm", "attention_allowed", "stack_layers",
           "layer_at", "window_at", "run_blocks", "rope_frequencies", "Rope", "rope_tables",
           "rope_at", "apply_rope", "KVCache", "block_cached", "softcap"]

Array = jax.Array


class MixedWeight(NamedTuple):
    """A parameter `(1 - alpha) * start + alpha * target`, kept factored, optionally only at some
    token positions.

    A matmul with a `MixedWeight` whose alpha varies only along output axes (or only along input
    axes, or not at all) never builds the mixed weight: it computes `x @ start` and `x @ target`
    with float32 accumulation and mixes the two. This is how many candidate patches run in one
    batch without a weight copy per candidate. At alpha = 0 and 1 the result is the matmul with
    `start` or `target` itself, up to the order of its float32 sums. Any params leaf may be a
    `MixedWeight`.

    With `where`, the patch applies per token position (Dynamic Weight Grafting, Nief et al.
    2026): at position s of prompt b the coefficients are `alpha * where[b, s]`, so the
    module computes with the target's weights only where `where` is 1 (the keys and values
    of other positions, and everything they feed, keep the start's). Every use of such a leaf
    mixes per position: matmuls in their mixing space, norm weights, biases and embedding
    rows as `[batch, seq, ...]` values (`dense` with the activation's rank). A pass that
    computes only some positions gathers `where` with them (`at_positions`).

    Attributes:
        start: the weight patched into.
        target: the weight copied from (same shape).
        alpha: coefficients of the same rank, broadcastable to `start`.
        where: None (every position), or float `[batch, seq]` over the positions the pass
            computes.

    Example:
        >>> w = MixedWeight(jnp.zeros((2, 2)), jnp.ones((2, 2)), jnp.array([[0.0, 1.0]]))
        >>> w.value().tolist()
        [[0.0, 1.0], [0.0, 1.0]]
    """

    start: Array
    target: Array
    alpha: Array
    where: Array | None = None

    def value(self, rank: int | None = None) -> Array:
        """The mixed weight, materialized (as `jaxpatch.mix_leaf` computes it).

        Arguments:
            rank: with `where`, the rank of the activation the weight meets (`[batch, seq,
                ...]`): the value is per position, of that rank, broadcasting against it.

        Example:
            >>> w = MixedWeight(jnp.zeros(2), jnp.ones(2), jnp.ones(1), jnp.array([[1.0, 0.0]]))
            >>> w.value(rank=3).tolist()  # [batch, seq, d]: the target at position 0 only
            [[[1.0, 1.0], [0.0, 0.0]]]
        """
        alpha = self.alpha.astype(self.start.dtype)
        if self.where is not None:
            if rank is None or rank < 2 + self.start.ndim:
                raise ValueError("a position-restricted weight is used by an operation that "
                                 "does not mix per position")
            alpha = _per_position(self.where, rank).astype(alpha.dtype) * alpha
        return (1 - alpha) * self.start + alpha * self.target


def _per_position(where: Array, rank: int) -> Array:
    """`where` `[batch, seq]` shaped to broadcast against an activation of `rank`."""
    return where.reshape(*where.shape, *(1,) * (rank - 2))


def at_positions(params: Any, positions: Array) -> Any:
    """Params whose position-restricted leaves (`MixedWeight.where`) are gathered at
    `positions` (int `[batch, q]`): for a pass that computes only those positions. Other
    leaves are returned as they are.

    Example:
        >>> w = MixedWeight(jnp.zeros(2), jnp.ones(2), jnp.ones(1), jnp.array([[0.0, 1.0]]))
        >>> at_positions({"weight": w}, jnp.array([[1]]))["weight"].where.tolist()
        [[1.0]]
    """
    def gather(leaf: Any) -> Any:
        if isinstance(leaf, MixedWeight) and leaf.where is not None:
            return leaf._replace(where=jnp.take_along_axis(leaf.where, positions, axis=1))
        return leaf

    return jax.tree_util.tree_map(gather, params, is_leaf=lambda x: isinstance(x, MixedWeight))


class Probe(NamedTuple):
    """A weight `base` carrying a zero-valued patch direction, for first-order attribution.

    Its value is `base + alpha * (target - start)` at alpha = 0, i.e. `base`; what it adds is
    the derivative with respect to alpha, `<dL/dW, target - start>` summed over the axes alpha
    broadcasts along. A matmul with a probe (`probe_einsum`) computes that derivative in its
    backward pass from the layer's input and output gradient, in the same matmul layouts as the
    forward pass, without forming the weight gradient or the difference of the whole model.
    Any other use (norm weights, biases, embedding rows) differentiates `value()`.

    Only alpha = 0 is supported: a matmul with a probe uses `base` alone.

    Attributes:
        base: the weight the model runs with.
        start, target: the pair whose difference is the patch direction.
        alpha: zeros of the same rank, broadcastable to `base` (the coefficient layout).

    Example:
        >>> p = Probe(jnp.ones(2), jnp.zeros(2), jnp.full(2, 3.0), jnp.zeros(1))
        >>> float(jax.grad(lambda a: p._replace(alpha=a).value().sum())(p.alpha)[0])
        6.0
    """

    base: Array
    start: Array
    target: Array
    alpha: Array

    def delta(self) -> Array:
        """The patch direction `target - start`."""
        return self.target - self.start

    def value(self) -> Array:
        """The weight, `base + alpha * delta` (differentiable in alpha)."""
        return self.base + self.alpha.astype(self.base.dtype) * self.delta()


def dense(leaf: Array | MixedWeight | Probe, rank: int | None = None) -> Array:
    """A params leaf as a plain array (materializing a `MixedWeight` or `Probe`).

    Arguments:
        leaf: the leaf.
        rank: the rank of the activation it meets, for a position-restricted `MixedWeight`
            (whose value is then per position, `[batch, seq, ...]`).

    Example:
        >>> dense(jnp.ones(2)).tolist()
        [1.0, 1.0]
    """
    if isinstance(leaf, MixedWeight):
        return leaf.value(rank)
    return leaf.value() if isinstance(leaf, Probe) else leaf


Edit = Callable[[str, Array], Array]
"""An activation edit: called as `edit(site, value)` on every site's output, returns the value
to use instead. Sites (per block i, prefixed `layers.{i}.`): `input_layernorm`,
`self_attn.{q,k,v}_proj` (`[batch, seq, heads, head_dim]`, before rotary embedding),
`self_attn.heads` (each head's output before o_proj), `self_attn.o_proj`,
`post_attention_layernorm`, `mlp.{gate,up}_proj`, `mlp.neurons` (the `[batch, seq, d_ff]`
activations entering down_proj), `mlp.down_proj`; and `embed_tokens`, `embed_positions`
(GPT-2), `norm`, `lm_head`."""


def _no_edit(site: str, value: Array) -> Array:
    return value


class ForwardOutput(NamedTuple):
    """What `forward` returns.

    Attributes:
        logits: float32 `[batch, seq, vocab]`, or None when the pass stopped early.
        residual: the residual stream after the last block run, `[batch, seq, d_model]`.
        residuals: with `collect=True`, the residual stream after each block run, in order
            (block `start_layer` first); else an empty tuple.
        modules: with `collect=True`, each module's output by name:
            `layers.{i}.self_attn` and `layers.{i}.mlp` (what the module adds to the residual
            stream, `[batch, seq, d_model]`) and `layers.{i}.self_attn.heads` (each head's
            output before o_proj, `[batch, seq, n_heads, head_dim]`); else empty.
    """

    logits: Array | None
    residual: Array
    residuals: tuple[Array, ...]
    modules: dict[str, Array]

    def read(self, layer: int | None) -> Array:
        """What a metric anchored after block `layer` reads: the residual stream after the
        last block run, or the logits when `layer` is None (the pass ran to the end).

        Example:
            >>> from jaxpatch.models.config import ModelConfig, init_params
            >>> cfg = ModelConfig.tiny("llama")
            >>> out = forward(cfg, init_params(cfg, jax.random.key(0)), jnp.zeros((1, 3), int))
            >>> out.read(None).shape, out.read(1) is out.residual
            ((1, 3, 128), True)
        """
        if layer is not None:
            return self.residual
        if self.logits is None:
            raise ValueError("this pass stopped before the logits: read it with its stop layer")
        return self.logits


def forward(
    config: ModelConfig,
    params: Params,
    tokens: Array,
    attention_mask: Array | None = None,
    *,
    start_layer: int = 0,
    residual: Array | None = None,
    stop_layer: int | None = None,
    collect: bool = False,
    readout_positions: Array | None = None,
    remat: bool = False,
    edit: Edit | None = None,
) -> ForwardOutput:
    """Runs the model on a batch of token ids.

    Arguments:
        config: the architecture (static under jit).
        params: the params pytree (see `param_shapes`).
        tokens: int `[batch, seq]` token ids. Batches are right-padded.
        attention_mask: optional `[batch, seq]`, 1 for real tokens, 0 for padding.
        start_layer: begin at this block (0-based); `residual` must then hold the residual
            stream before it, as returned by an earlier pass stopped at `start_layer - 1`.
        residual: the residual stream to start from, `[batch, seq, d_model]`.
        stop_layer: stop after this block (0-based, inclusive); no final norm or logits.
        collect: also return the residual after every block and every module's output.
        readout_positions: optional int `[batch, q]`: the last block run computes its output
            only at these positions (keys and values still cover the whole sequence), so the
            returned residual and logits are `[batch, q, ...]`. Used when a metric reads only
            a few positions.
        remat: recompute each block's activations in the backward pass instead of storing
            them (`jax.checkpoint`). XLA's CPU compiler keeps most activations anyway;
            `jaxpatch.attribute` with `Execution(remat=True)` runs block by block instead.
        edit: an activation edit (see `Edit`), e.g. to patch activations or record them.

    Returns:
        A `ForwardOutput`.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("llama")
        >>> params = init_params(cfg, jax.random.key(0))
        >>> out = forward(cfg, params, jnp.zeros((2, 5), jnp.int32))
        >>> out.logits.shape
        (2, 5, 128)
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    batch, seq = tokens.shape
    if start_layer > 0 and residual is None:
        raise ValueError(f"start_layer={start_layer} needs the residual stream before that block")
    last = config.n_layers - 1 if stop_layer is None else stop_layer
    if not 0 <= start_layer <= last + 1 or last >= config.n_layers:
        raise ValueError(
            f"blocks {start_layer}..{last} are out of range for {config.n_layers} layers"
        )
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq), jnp.bool_)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)

    if seq > config.max_position_embeddings:
        raise InvalidInputError(f"sequence of {seq} tokens is longer than the model's context of "
                                f"{config.max_position_embeddings}")
    edit = edit or _no_edit
    x = embed(config, params, tokens, edit) if residual is None else residual
    rope = rope_tables(config, seq, x.dtype)
    residuals: list[Array] = []
    modules: dict[str, Array] = {}
    if readout_positions is not None and last < start_layer:  # no block runs: just gather
        x = jnp.take_along_axis(x, readout_positions[..., None], axis=1)
    run_block = jax.checkpoint(block, static_argnums=(0, 6)) if remat else block
    for i in range(start_layer, last + 1):
        allowed = attention_allowed(attention_mask, config.sliding_windows[i])
        queries = readout_positions if i == last else None
        block_edit = functools.partial(_edit_in_block, edit, i)
        x, outputs = run_block(config, params["layers"][i], x, allowed, rope_at(config, rope, i),
                               queries, block_edit)
        if collect:
            residuals.append(x)
            modules.update({f"layers.{i}.{name}": value for name, value in outputs.items()})
    final = params if readout_positions is None else at_positions(params, readout_positions)
    logits = unembed(config, final, x, edit) if stop_layer is None else None
    return ForwardOutput(logits, x, tuple(residuals), modules)


def _edit_in_block(edit: Edit, index: int, site: str, value: Array) -> Array:
    return edit(f"layers.{index}.{site}", value)


def embed(config: ModelConfig, params: Params, tokens: Array, edit: Edit = _no_edit,
          positions: Array | None = None) -> Array:
    """Token (and, for learned positions, position) embeddings: the residual stream before
    block 0, `[batch, seq, d_model]`. `positions` (int `[batch, seq]`, default 0, 1, ...) are
    the tokens' places in the sequence (a decoding step embeds one token at its place).

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("gpt2")
        >>> embed(cfg, init_params(cfg, jax.random.key(0)), jnp.ones((1, 3), jnp.int32)).shape
        (1, 3, 32)
    """
    x = edit("embed_tokens", lookup(params["embed_tokens"]["weight"], tokens))
    if config.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(config.d_model), dtype=x.dtype)
    if config.positional == "learned":
        positions = jnp.arange(tokens.shape[1])[None] if positions is None else positions
        x = x + edit("embed_positions", lookup(params["embed_positions"]["weight"], positions))
    return x


def lookup(table: Array | MixedWeight | Probe, ids: Array) -> Array:
    """Rows `ids` of an embedding table (a factored `MixedWeight` or `Probe` with scalar alpha
    stays factored: only the rows are read).

    Example:
        >>> lookup(jnp.eye(3), jnp.array([[2]])).tolist()
        [[[0.0, 0.0, 1.0]]]
    """
    if isinstance(table, MixedWeight) and table.alpha.size == 1:
        alpha = table.alpha.reshape(())
        if table.where is not None:
            alpha = alpha * table.where.astype(alpha.dtype)[..., None]
        rows = MixedWeight(jnp.take(table.start, ids, axis=0), jnp.take(table.target, ids, axis=0),
                           alpha)
        return rows.value()
    if isinstance(table, Probe) and table.alpha.size == 1:
        alpha = table.alpha.reshape(()).astype(table.base.dtype)
        delta = jnp.take(table.target, ids, axis=0) - jnp.take(table.start, ids, axis=0)
        return jnp.take(table.base, ids, axis=0) + alpha * delta
    return jnp.take(dense(table), ids, axis=0)


def unembed(config: ModelConfig, params: Params, x: Array, edit: Edit = _no_edit) -> Array:
    """Final norm and output projection: float32 logits `[batch, seq, vocab]`.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("qwen2")
        >>> unembed(cfg, init_params(cfg, jax.random.key(0)), jnp.ones((1, 2, 32))).shape
        (1, 2, 128)
    """
    h = edit("norm", norm(config, params["norm"], x))
    if config.tie_embeddings:
        logits = linear({"weight": params["embed_tokens"]["weight"]}, h, "bsd,vd->bsv")
    else:
        logits = edit("lm_head", linear(params["lm_head"], h, "bsd,dv->bsv"))
    return softcap(logits, config.final_logit_softcap).astype(jnp.float32)


def softcap(x: Array, cap: float | None) -> Array:
    """`cap * tanh(x / cap)` in x's dtype (Gemma 2's logit capping), or x when cap is None.

    Example:
        >>> round(float(softcap(jnp.asarray(100.0), 30.0)), 3)
        29.924
    """
    if cap is None:
        return x
    c = jnp.asarray(cap, x.dtype)
    return jnp.tanh(x / c) * c


def block(
    config: ModelConfig,
    layer: Params,
    x: Array,
    allowed: Array,
    rope: tuple[Array, Array] | None,
    queries: Array | None = None,
    edit: Edit = _no_edit,
) -> tuple[Array, dict[str, Array]]:
    """One pre-norm transformer block (with `config.sandwich_norms`, also normed outputs).

    Arguments:
        config: the architecture.
        layer: this block's params (`params["layers"][i]`).
        x: the residual stream before the block, `[batch, seq, d_model]`.
        allowed: boolean `[batch, 1, seq, seq]`: may query position q attend to key k.
        rope: `(cos, sin)` tables from `rope_tables`, or None for learned positions.
        queries: optional int `[batch, q]`: compute the block's output only at these positions.
        edit: an activation edit (see `Edit`; site names without the `layers.{i}.` prefix).

    Returns:
        The residual stream after the block (`[batch, q, d_model]` with `queries`), and the
        module outputs (`self_attn` and `mlp`: what each adds to the stream, after its post-norm
        if any; `self_attn.heads`).

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("mistral")
        >>> p = init_params(cfg, jax.random.key(0))
        >>> allowed = attention_allowed(jnp.ones((1, 4), bool), None)
        >>> y, outs = block(cfg, p["layers"][0], jnp.ones((1, 4, 32)), allowed,
        ...                 rope_tables(cfg, 4, jnp.float32))
        >>> sorted(outs)
        ['mlp', 'self_attn', 'self_attn.heads']
    """
    normed = _pre_norm(config, layer, config.pre_attention_norm, x, edit)
    heads = edit("self_attn.heads",
                 attention_heads(config, layer["self_attn"], normed, allowed, rope, queries, edit))
    if queries is not None:
        x = jnp.take_along_axis(x, queries[..., None], axis=1)
        layer = at_positions(layer, queries)
    return _after_attention(config, layer, x, heads, edit)


def _after_attention(config: ModelConfig, layer: Params, x: Array, heads: Array,
                     edit: Edit) -> tuple[Array, dict[str, Array]]:
    """The rest of a block once its heads are computed: o_proj (and its post-norm), the
    residual, the MLP (and its norms), the residual."""
    attn_out = edit("self_attn.o_proj", linear(layer["self_attn"]["o_proj"], heads, "bshk,hkd->bsd"))
    output_norms = config.output_norms
    if output_norms is not None:
        attn_out = edit(output_norms[0], norm(config, layer[output_norms[0]], attn_out))
    x = x + attn_out
    mlp_out = mlp(config, layer["mlp"], _pre_norm(config, layer, config.pre_mlp_norm, x, edit), edit)
    if output_norms is not None:
        mlp_out = edit(output_norms[1], norm(config, layer[output_norms[1]], mlp_out))
    x = x + mlp_out
    return x, {"self_attn": attn_out, "self_attn.heads": heads, "mlp": mlp_out}


def _pre_norm(config: ModelConfig, layer: Params, name: str | None, x: Array, edit: Edit) -> Array:
    """The named norm of a block applied to the stream (x itself when the block has none)."""
    return x if name is None else edit(name, norm(config, layer[name], x))


def linear(module: Params, x: Array, spec: str) -> Array:
    """`einsum(spec, x, weight) + bias` for one linear module (bias optional).

    Example:
        >>> linear({"weight": jnp.ones((2, 3))}, jnp.ones((1, 2)), "bi,io->bo").tolist()
        [[2.0, 2.0, 2.0]]
    """
    weight = module["weight"]
    if isinstance(weight, MixedWeight):
        y = mixed_einsum(spec, x, weight)
    elif isinstance(weight, Probe):
        y = probe_einsum(spec, x, weight)
    else:
        y = jnp.einsum(spec, x, weight)
    if "bias" in module:
        y = y + dense(module["bias"], y.ndim)
    return y


def mixed_einsum(spec: str, x: Array, weight: MixedWeight) -> Array:
    """`einsum(spec, x, weight.value())` without building the mixed weight when alpha varies
    only along the weight's output axes, only along its input axes, or not at all: the matmuls
    with start and target accumulate in float32 and mix there, rounded once to x's dtype.

    Example:
        >>> w = MixedWeight(jnp.ones((2, 3)), 2 * jnp.ones((2, 3)), jnp.array([[0.0, 1.0, 0.5]]))
        >>> mixed_einsum("bi,io->bo", jnp.ones((1, 2)), w).tolist()
        [[2.0, 4.0, 3.0]]
    """
    x_spec, rest = spec.split(",")
    w_spec, y_spec = rest.split("->")
    f32 = jnp.float32
    alpha = weight.alpha.astype(f32)
    varying = {letter for letter, n in zip(w_spec, alpha.shape) if n != 1}
    out_dtype = jnp.result_type(x, weight.start)

    def matmul(inputs: Array, w: Array) -> Array:
        return jnp.einsum(spec, inputs, w, preferred_element_type=f32)

    def positioned(a: Array, labels: str) -> Array:  # alpha times where, per position
        if weight.where is None:
            return a
        if labels[:2] != x_spec[:2]:
            raise ValueError(f"{spec}: a position-restricted weight needs [batch, seq, ...] inputs")
        return _per_position(weight.where.astype(f32), len(labels)) * a

    if not varying or varying <= set(y_spec) - set(x_spec):
        a = positioned(_align(alpha, w_spec, y_spec) if varying else alpha.reshape(()), y_spec)
        y = (1 - a) * matmul(x, weight.start) + a * matmul(x, weight.target)
    elif varying <= set(x_spec) - set(y_spec):
        a = positioned(_align(alpha, w_spec, x_spec), x_spec)
        xf = x.astype(f32)
        y = (matmul(((1 - a) * xf).astype(x.dtype), weight.start)
             + matmul((a * xf).astype(x.dtype), weight.target))
    elif weight.where is not None:
        raise ValueError(f"{spec}: coefficients varying along input and output axes cannot be "
                         "restricted to positions")
    else:
        return jnp.einsum(spec, x, weight.value())
    return y.astype(out_dtype)


def probe_einsum(spec: str, x: Array, weight: Probe) -> Array:
    """`einsum(spec, x, weight.base)`, whose derivative with respect to `weight.alpha` is
    computed in the backward pass without a weight gradient.

    With alpha varying along the weight's output axes (e.g. a neuron of up_proj), the
    derivative is `sum(einsum(spec, x, delta) * dy)` over the other axes; along its input axes
    (a neuron of down_proj, a head of o_proj), `sum(x * einsum(dy, delta))`. Both are matmuls of
    the forward or input-gradient shape. Other layouts contract the weight gradient with delta.

    Example:
        >>> w = Probe(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((1, 3)))
        >>> def score(alpha):
        ...     return probe_einsum("bi,io->bo", jnp.ones((1, 2)), w._replace(alpha=alpha)).sum()
        >>> jax.grad(score)(w.alpha).tolist()  # each output column's delta, summed over the input
        [[2.0, 2.0, 2.0]]
    """
    return _probe_einsum(spec, x, weight.base, weight.start, weight.target, weight.alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _probe_einsum(spec: str, x: Array, base: Array, start: Array, target: Array,
                  alpha: Array) -> Array:
    return jnp.einsum(spec, x, base)


def _probe_einsum_fwd(spec: str, x: Array, base: Array, start: Array, target: Array,
                      alpha: Array) -> tuple[Array, tuple[Array, ...]]:
    return jnp.einsum(spec, x, base), (x, base, start, target, alpha)


def _probe_einsum_bwd(spec: str, residuals: tuple[Array, ...], dy: Array) -> tuple[Any, ...]:
    x, base, start, target, alpha = residuals
    x_spec, rest = spec.split(",")
    w_spec, y_spec = rest.split("->")
    to_input = f"{y_spec},{w_spec}->{x_spec}"
    dx = jnp.einsum(to_input, dy, base).astype(x.dtype)
    delta = target - start
    varying = "".join(letter for letter, n in zip(w_spec, alpha.shape) if n != 1)
    f32 = jnp.float32
    if varying and set(varying) <= set(x_spec) - set(y_spec):
        product = x.astype(f32) * jnp.einsum(to_input, dy, delta, preferred_element_type=f32)
        labels = x_spec
    elif set(varying) <= set(y_spec) - set(x_spec):
        product = jnp.einsum(spec, x, delta, preferred_element_type=f32) * dy.astype(f32)
        labels = y_spec
    else:
        grad_w = jnp.einsum(f"{x_spec},{y_spec}->{w_spec}", x, dy, preferred_element_type=f32)
        product, labels = grad_w * delta.astype(f32), w_spec
    d_alpha = jnp.einsum(f"{labels}->{varying}", product).reshape(alpha.shape).astype(alpha.dtype)
    return dx, None, None, None, d_alpha


_probe_einsum.defvjp(_probe_einsum_fwd, _probe_einsum_bwd)


def _align(alpha: Array, w_spec: str, target_spec: str) -> Array:
    """Reorders alpha's axes to broadcast against an array labelled `target_spec`."""
    shared = "".join(letter for letter in target_spec if letter in w_spec)
    moved = jnp.einsum(f"{w_spec}->{shared}", alpha)  # other axes of alpha have size 1
    sizes = dict(zip(shared, moved.shape))
    return moved.reshape([sizes.get(letter, 1) for letter in target_spec])


def attention_heads(
    config: ModelConfig,
    attn: Params,
    h: Array,
    allowed: Array,
    rope: tuple[Array, Array] | None,
    queries: Array | None = None,
    edit: Edit = _no_edit,
) -> Array:
    """Per-head attention outputs before o_proj, `[batch, seq, n_heads, head_dim]`.

    Query head j reads key/value head `j // queries_per_kv_head` (Hugging Face's repeat_kv).
    With `queries` (int `[batch, q]`), only those query positions are computed.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("gemma")
        >>> p = init_params(cfg, jax.random.key(0))["layers"][0]["self_attn"]
        >>> allowed = attention_allowed(jnp.ones((1, 3), bool), None)
        >>> attention_heads(cfg, p, jnp.ones((1, 3, 32)), allowed,
        ...                 rope_tables(cfg, 3, jnp.float32)).shape
        (1, 3, 4, 16)
    """
    h_q = h if queries is None else jnp.take_along_axis(h, queries[..., None], axis=1)
    q, k, v = _projections(config, attn, h_q, h, edit,
                           attn if queries is None else at_positions(attn, queries))
    if rope is not None:
        cos, sin = rope
        if queries is None:
            q = apply_rope(q, cos, sin)
        else:
            q = apply_rope(q, jnp.take(cos, queries, axis=0), jnp.take(sin, queries, axis=0))
        k = apply_rope(k, cos, sin)
    if queries is not None:
        allowed = jnp.take_along_axis(allowed, queries[:, None, :, None], axis=2)
    return _attend(config, q, k, v, allowed)


def _projections(config: ModelConfig, attn: Params, h_q: Array, h: Array, edit: Edit,
                 attn_q: Params | None = None) -> tuple[Array, Array, Array]:
    """Queries from `h_q` (with `attn_q`, the params at the query positions, when they are
    fewer), keys and values from `h` (with their norms, before rope)."""
    attn_q = attn if attn_q is None else attn_q
    q = edit("self_attn.q_proj", linear(attn_q["q_proj"], h_q, "bsd,dhk->bshk"))
    k = edit("self_attn.k_proj", linear(attn["k_proj"], h, "bsd,dhk->bshk"))
    v = edit("self_attn.v_proj", linear(attn["v_proj"], h, "bsd,dhk->bshk"))
    if config.qk_norm is not None:
        q = edit("self_attn.q_norm", _qk_norm(config, attn_q["q_norm"], q))
        k = edit("self_attn.k_norm", _qk_norm(config, attn["k_norm"], k))
    return q, k, v


def _qk_norm(config: ModelConfig, params: Params, x: Array) -> Array:
    """A query or key norm of `[b, s, heads, head_dim]`: over each head (`qk_norm="head_dim"`)
    or over the whole projection, all heads together (`"projection"`)."""
    if config.qk_norm == "head_dim":
        return norm(config, params, x)
    weight = params["weight"]
    if isinstance(weight, MixedWeight) and weight.where is not None:
        flat = {"weight": weight.value(x.ndim).reshape(*x.shape[:-2], -1)}
    else:
        flat = {"weight": dense(weight).reshape(-1)}
    return norm(config, flat, x.reshape(*x.shape[:-2], -1)).reshape(x.shape)


def _attend(config: ModelConfig, q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """Scaled dot-product attention of queries `[b, q, heads, d]` over keys and values
    `[b, s, kv_heads, d]`, where `allowed` `[b, 1, q, s]`; per-head outputs `[b, q, heads, d]`."""
    batch, n_queries = q.shape[:2]
    group = config.queries_per_kv_head
    q = q.reshape(batch, n_queries, config.n_kv_heads, group, config.head_dim)
    scale = config.head_dim**-0.5 if config.attention_scale is None else config.attention_scale
    scores = jnp.einsum("bqgrk,bsgk->bgrqs", q, k) * jnp.asarray(scale, q.dtype)
    scores = softcap(scores, config.attn_logit_softcap).astype(jnp.float32)
    scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrqs,bsgk->bqgrk", probs, v)
    return out.reshape(batch, n_queries, config.n_heads, config.head_dim)


def mlp(config: ModelConfig, params: Params, h: Array, edit: Edit = _no_edit) -> Array:
    """The MLP: `down(act(gate(h)) * up(h))` if gated, else `down(act(up(h)))`.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("llama")
        >>> p = init_params(cfg, jax.random.key(0))["layers"][0]["mlp"]
        >>> mlp(cfg, p, jnp.ones((1, 2, 32))).shape
        (1, 2, 32)
    """
    up = edit("mlp.up_proj", linear(params["up_proj"], h, "bsd,df->bsf"))
    if config.gated_mlp:
        gate = edit("mlp.gate_proj", linear(params["gate_proj"], h, "bsd,df->bsf"))
        hidden = activation(config.activation, gate) * up
    else:
        hidden = activation(config.activation, up)
    return edit("mlp.down_proj", linear(params["down_proj"], edit("mlp.neurons", hidden), "bsf,fd->bsd"))


def activation(name: str, x: Array) -> Array:
    """The named activation function ("gelu_tanh", "gelu", "silu", "relu").

    Example:
        >>> float(activation("relu", jnp.asarray(-1.0)))
        0.0
    """
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def norm(config: ModelConfig, params: Params, x: Array) -> Array:
    """LayerNorm or RMSNorm, computed in float32 and cast back to the input dtype.

    Example:
        >>> from jaxpatch.models.config import ModelConfig
        >>> cfg = ModelConfig.tiny("llama")
        >>> y = norm(cfg, {"weight": jnp.ones(32)}, jnp.full((1, 32), 3.0))
        >>> round(float(y[0, 0]), 4)
        1.0
    """
    params = {name: dense(leaf, x.ndim) for name, leaf in params.items()}
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    if config.norm == "layernorm":
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + config.norm_eps)
        y = y * params["weight"].astype(jnp.float32) + params["bias"].astype(jnp.float32)
        return y.astype(dtype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + config.norm_eps)
    if config.norm_scale_in_float32:
        # Gemma: (1 + w), OLMo 2: w, applied in float32, then cast.
        return (y * (config.norm_weight_offset + params["weight"].astype(jnp.float32))).astype(dtype)
    # Llama: cast first, then scale in the weight's dtype.
    return params["weight"] * y.astype(dtype)


def attention_allowed(attention_mask: Array, window: int | Array | None) -> Array:
    """Which keys each query may attend to: causal, not padding, within the sliding window.

    Arguments:
        attention_mask: bool `[batch, seq]`, True for real tokens.
        window: attend only to the last `window` positions (the query's own included), or
            None for full causal attention (may be a traced scalar).

    Returns:
        bool `[batch, 1, seq, seq]` indexed `[b, 0, query, key]`.

    Example:
        >>> attention_allowed(jnp.ones((1, 3), bool), 2)[0, 0].astype(int).tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    seq = attention_mask.shape[1]
    q = jnp.arange(seq)[:, None]
    k = jnp.arange(seq)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed[None, None] & attention_mask[:, None, None, :]


def stack_layers(layers: list[Params]) -> Params:
    """The blocks' params stacked along a new leading axis (for loops over a traced index).

    Example:
        >>> stack_layers([{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}])["w"].shape
        (2, 2)
    """
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


def layer_at(stacked: Params, index: Array | int) -> Params:
    """Block `index`'s params from `stack_layers` output (`index` may be traced).

    Example:
        >>> float(layer_at({"w": jnp.arange(3.0)}, jnp.int32(2))["w"])
        2.0
    """
    return jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), stacked)


def window_at(config: ModelConfig, index: Array | int) -> Array | None:
    """Block `index`'s sliding window (`index` may be traced); None if no block has one.

    Example:
        >>> from jaxpatch.models.config import ModelConfig
        >>> window_at(ModelConfig.tiny("llama"), 0) is None
        True
    """
    if all(w is None for w in config.sliding_windows):
        return None
    unlimited = config.max_position_embeddings + 1
    windows = jnp.asarray([unlimited if w is None else w for w in config.sliding_windows])
    return windows[index]


def run_blocks(config: ModelConfig, stacked: Params, x: Array, attention_mask: Array,
               rope: Rope | None, first: Array | int, stop: Array | int) -> Array:
    """Runs blocks `first .. stop - 1` (bounds may be traced) over stacked params, in a loop
    that compiles one block whatever the bounds.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("llama")
        >>> stacked = stack_layers(init_params(cfg, jax.random.key(0))["layers"])
        >>> x = jnp.ones((1, 3, 32))
        >>> bool((run_blocks(cfg, stacked, x, jnp.ones((1, 3), bool), None, 1, 1) == x).all())
        True
    """
    def body(i: Array, h: Array) -> Array:
        allowed = attention_allowed(attention_mask, window_at(config, i))
        return block(config, layer_at(stacked, i), h, allowed, rope_at(config, rope, i))[0]

    return jax.lax.fori_loop(first, stop, body, x)


def rope_frequencies(config: ModelConfig, sliding: bool = False) -> np.ndarray:
    """The rotary inverse frequencies, float32 `[head_dim // 2]`, rescaled as configured.

    Arguments:
        config: the architecture.
        sliding: the sliding-window blocks' frequencies (base `sliding_rope_theta`, never
            rescaled) when the config gives them their own.

    Example:
        >>> from jaxpatch.models.config import ModelConfig
        >>> rope_frequencies(ModelConfig.tiny("llama"))[:2].tolist()
        [1.0, 0.10000000149011612]
    """
    dim = config.head_dim
    own = sliding and config.sliding_rope_theta is not None
    theta = config.sliding_rope_theta if own else config.rope_theta
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    return inv_freq if own else _rescale(inv_freq, config.rope_scaling)


def _rescale(inv_freq: np.ndarray, scaling: RopeScaling | None) -> np.ndarray:
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    old_len = np.float32(scaling.original_max_position_embeddings)
    low, high = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


Rope = tuple[Array, Array]
"""Rotary `(cos, sin)` tables: `[seq, head_dim]` each for one block, or with a leading axis of 2
(full-attention blocks, sliding-window blocks) as `rope_tables` returns them for a config with
`sliding_rope_theta`; `rope_at` picks a block's."""


def rope_tables(config: ModelConfig, seq: int, dtype: jnp.dtype) -> Rope | None:
    """`(cos, sin)` for positions `0..seq-1`, each `[seq, head_dim]`, cast to `dtype`; with
    `config.sliding_rope_theta`, each `[2, seq, head_dim]` (full-attention blocks first); None
    for a model with learned positions (no rotary embedding).

    Example:
        >>> from jaxpatch.models.config import ModelConfig
        >>> cos, sin = rope_tables(ModelConfig.tiny("llama"), 4, jnp.float32)
        >>> cos.shape, float(cos[0, 0])
        ((4, 8), 1.0)
        >>> rope_tables(ModelConfig.tiny("gemma3_text"), 4, jnp.float32)[0].shape
        (2, 4, 16)
        >>> rope_tables(ModelConfig.tiny("gpt2"), 4, jnp.float32) is None
        True
    """
    if config.positional != "rope":
        return None

    def tables(sliding: bool) -> Rope:
        inv_freq = jnp.asarray(rope_frequencies(config, sliding))
        angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)

    if config.sliding_rope_theta is None:
        return tables(False)
    (cos_full, sin_full), (cos_local, sin_local) = tables(False), tables(True)
    return jnp.stack([cos_full, cos_local]), jnp.stack([sin_full, sin_local])


def rope_at(config: ModelConfig, rope: Rope | None, index: Array | int) -> Rope | None:
    """Block `index`'s rotary tables out of `rope_tables`' (`index` may be traced).

    Example:
        >>> from jaxpatch.models.config import ModelConfig
        >>> cfg = ModelConfig.tiny("gemma3_text")  # block 0 slides, block 1 is global
        >>> tables = rope_tables(cfg, 4, jnp.float32)
        >>> bool((rope_at(cfg, tables, 1)[1] == tables[1][0]).all())
        True
    """
    if rope is None or config.sliding_rope_theta is None:
        return rope
    sliding = jnp.asarray([w is not None for w in config.sliding_windows], jnp.int32)[index]
    return rope[0][sliding], rope[1][sliding]


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `[batch, seq, heads, head_dim]` by the rotary tables (rotate-half layout).

    The tables are `[seq, head_dim]`, or `[batch, seq, head_dim]` for per-row positions.

    Example:
        >>> x = jnp.ones((1, 1, 1, 2))
        >>> apply_rope(x, jnp.ones((1, 2)), jnp.zeros((1, 2))).tolist()
        [[[[1.0, 1.0]]]]
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


class KVCache(NamedTuple):
    """One block's keys (after their norm and rope) and values at every position of a
    sequence buffer, `[batch, length, kv_heads, head_dim]` each (a pytree)."""

    k: Array
    v: Array


def block_cached(config: ModelConfig, layer: Params, x: Array, cache: KVCache, positions: Array,
                 allowed: Array, rope: tuple[Array, Array] | None,
                 edit: Edit = _no_edit) -> tuple[Array, KVCache]:
    """One block at some positions of a sequence whose other keys and values are cached: the
    positions' keys and values are written into the cache, then their queries attend over it
    (a decoding step: one position; a prefill: every position). The same operations as `block`.

    Arguments:
        config: the architecture.
        layer: this block's params.
        x: the residual stream at `positions`, `[batch, q, d_model]`.
        cache: the block's keys and values over the whole buffer.
        positions: int `[batch, q]`: where in the buffer `x` stands.
        allowed: boolean `[batch, 1, q, length]`: may each position attend to each key.
        rope: `(cos, sin)` tables over the whole buffer, or None.
        edit: an activation edit (site names without the `layers.{i}.` prefix).

    Returns:
        The residual stream after the block at `positions`, and the updated cache.

    Example:
        >>> import jax
        >>> from jaxpatch.models.config import ModelConfig, init_params
        >>> cfg = ModelConfig.tiny("llama")
        >>> p = init_params(cfg, jax.random.key(0))["layers"][0]
        >>> x = jax.random.normal(jax.random.key(1), (1, 4, 32))
        >>> allowed = attention_allowed(jnp.ones((1, 4), bool), None)
        >>> rope = rope_tables(cfg, 4, jnp.float32)
        >>> empty = KVCache(*(jnp.zeros((1, 4, cfg.n_kv_heads, cfg.head_dim)),) * 2)
        >>> y, cache = block_cached(cfg, p, x, empty, jnp.arange(4)[None], allowed, rope)
        >>> bool(jnp.allclose(y, block(cfg, p, x, allowed, rope)[0], atol=1e-6))
        True
    """
    normed = _pre_norm(config, layer, config.pre_attention_norm, x, edit)
    q, k, v = _projections(config, layer["self_attn"], normed, normed, edit)
    if rope is not None:
        cos, sin = (jnp.take(t, positions, axis=0) for t in rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = jnp.arange(x.shape[0])[:, None]
    cache = KVCache(cache.k.at[rows, positions].set(k.astype(cache.k.dtype)),
                    cache.v.at[rows, positions].set(v.astype(cache.v.dtype)))
    heads = edit("self_attn.heads", _attend(config, q, cache.k, cache.v, allowed))
    return _after_attention(config, layer, x, heads, edit)[0], cache

