"""The forward pass as a pure function: partial runs, jit, vmap, grad, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch.errors import InvalidInputError
from jaxpatch.models.decoder import attention_allowed


def tiny(family: str, seed: int = 0) -> jaxpatch.Model:
    config = jaxpatch.ModelConfig.tiny(family)
    return jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(seed), scale=0.2))


TOKENS = np.array([[3, 9, 27, 81, 5, 7], [11, 13, 17, 19, 0, 0]], np.int32)
MASK = TOKENS != 0


@pytest.mark.parametrize("family", jaxpatch.FAMILIES)
def test_stop_then_start_equals_full_pass(family: str) -> None:
    m = tiny(family)
    full = jaxpatch.forward(m.config, m.params, TOKENS, MASK).logits
    head = jaxpatch.forward(m.config, m.params, TOKENS, MASK, stop_layer=0)
    assert head.logits is None
    tail = jaxpatch.forward(m.config, m.params, TOKENS, MASK, start_layer=1, residual=head.residual)
    np.testing.assert_allclose(tail.logits, full, atol=1e-5)


def test_collect_returns_every_block_and_module() -> None:
    m = tiny("llama")
    out = jaxpatch.forward(m.config, m.params, TOKENS, MASK, collect=True)
    assert len(out.residuals) == m.config.n_layers
    np.testing.assert_array_equal(out.residuals[-1], out.residual)
    assert set(out.modules) == {f"layers.{i}.{n}" for i in range(2)
                                for n in ("self_attn", "self_attn.heads", "mlp")}
    assert out.modules["layers.1.self_attn.heads"].shape == (2, 6, 4, 8)
    # The residual after block 1 is the one after block 0 plus what block 1's modules add.
    added = out.modules["layers.1.self_attn"] + out.modules["layers.1.mlp"]
    np.testing.assert_allclose(out.residuals[1], out.residuals[0] + added, atol=1e-5)


def test_jit_vmap_and_grad_are_safe() -> None:
    m = tiny("qwen2")
    config = m.config

    @jax.jit
    def loss(params: dict) -> jax.Array:
        logits = jaxpatch.forward(config, params, TOKENS, MASK).logits
        return jax.nn.logsumexp(logits, -1).mean()

    grads = jax.jit(jax.grad(loss))(m.params)
    g = grads["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert g.shape == (32, 4, 8) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
    # Directional derivative against a central finite difference.
    direction = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 1e-3, m.params)
    shifted = lambda s: loss(jax.tree_util.tree_map(lambda p, d: p + s * d, m.params, direction))
    numeric = (shifted(1.0) - shifted(-1.0)) / 2
    analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads),
                                                   jax.tree_util.tree_leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)
    # vmap over two stacked param sets equals running each.
    other = tiny("qwen2", seed=1).params
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), m.params, other)
    batched = jax.vmap(lambda p: jaxpatch.forward(config, p, TOKENS, MASK).logits)(stacked)
    np.testing.assert_allclose(batched[1], jaxpatch.forward(config, other, TOKENS, MASK).logits,
                               atol=1e-5)


def test_bfloat16_forward_keeps_activations_in_bfloat16() -> None:
    config = jaxpatch.ModelConfig.tiny("gemma", dtype="bfloat16")
    params = jaxpatch.init_params(config, jax.random.key(0), scale=0.2)
    out = jaxpatch.forward(config, params, TOKENS, MASK)
    assert out.residual.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    reference = jaxpatch.forward(config, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32),
                                                                params), TOKENS, MASK)
    assert float(jnp.abs(out.read(None) - reference.read(None)).max()) < 0.1


def test_sliding_window_limits_what_a_query_sees() -> None:
    allowed = np.asarray(attention_allowed(jnp.ones((1, 5), bool), 2))[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True]
    padded = np.asarray(attention_allowed(jnp.array([[True, True, False]]), None))[0, 0]
    assert padded[2].tolist() == [True, True, False]


def test_model_refuses_bad_tokens() -> None:
    m = tiny("gpt2")
    with pytest.raises(InvalidInputError, match="token id 128 at \\[0, 1\\] is out of range"):
        m([[1, 128]])
    with pytest.raises(InvalidInputError, match="-1"):
        m([[-1, 2]])
    with pytest.raises(InvalidInputError, match="65 tokens is longer than the model's context of 64"):
        m(np.ones((1, 65), np.int32))
    with pytest.raises(InvalidInputError, match="integers"):
        m([[1.5, 2.0]])
    with pytest.raises(InvalidInputError, match="attention_mask has shape"):
        m([[1, 2]], [[1]])


@pytest.mark.parametrize("spec, x_shape, w_shape, alpha_shape", [
    ("bsd,df->bsf", (2, 3, 4), (4, 5), (1, 5)),           # output axis: a neuron of up_proj
    ("bsf,fd->bsd", (2, 3, 5), (5, 4), (5, 1)),           # input axis: a neuron of down_proj
    ("bsd,dhk->bshk", (2, 3, 4), (4, 2, 3), (1, 2, 1)),   # a head of q_proj
    ("bshk,hkd->bsd", (2, 3, 2, 3), (2, 3, 4), (2, 1, 1)),  # a head of o_proj
    ("bsd,df->bsf", (2, 3, 4), (4, 5), (1, 1)),           # a whole module
    ("bsd,df->bsf", (2, 3, 4), (4, 5), (4, 5)),           # both axes: the weight-gradient path
])
def test_probe_matmul_has_the_derivatives_of_the_mixed_weight(
        spec: str, x_shape: tuple, w_shape: tuple, alpha_shape: tuple) -> None:
    """A `Probe` gives d/d alpha and d/d x of `x @ (base + alpha * (target - start))` at
    alpha = 0, whichever axes alpha varies along."""
    from jaxpatch.models.decoder import Probe, probe_einsum

    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], x_shape)
    start, target, base = (jax.random.normal(k, w_shape) for k in keys[1:4])
    y_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, base)).shape
    readout = jax.random.normal(keys[4], y_shape)
    zero = jnp.zeros(alpha_shape)

    def probed(alpha: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(probe_einsum(spec, x, Probe(base, start, target, alpha))) * readout)

    def mixed(alpha: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(jnp.einsum(spec, x, base + alpha * (target - start))) * readout)

    assert float(probed(zero, x)) == pytest.approx(float(mixed(zero, x)), rel=1e-6)
    got = jax.grad(probed, argnums=(0, 1))(zero, x)
    want = jax.grad(mixed, argnums=(0, 1))(zero, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
