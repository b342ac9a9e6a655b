"""Patches as coefficient pytrees: construction, algebra, apply, serialization, adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxpatch
from jaxpatch import Patch, PatchError, apply
from jaxpatch.patch import ablation_target, alpha_shapes, check_compatible

CONFIG = jaxpatch.ModelConfig.tiny("llama")
BASE = jaxpatch.init_params(CONFIG, jax.random.key(0))
DONOR = jaxpatch.init_params(CONFIG, jax.random.key(1))


def flat(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in jaxpatch.flatten_params(tree).items()}


def test_alpha_shapes_expose_heads_and_neurons() -> None:
    shapes = alpha_shapes(CONFIG)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (1, 4, 1)
    assert shapes["layers.0.self_attn.k_proj.weight"] == (1, 2, 1)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (4, 1, 1)
    assert shapes["layers.0.mlp.down_proj.weight"] == (64, 1)
    assert shapes["embed_tokens.weight"] == (1, 1)


def test_head_patch_moves_exactly_that_head() -> None:
    patched = flat(apply(Patch.from_selector(CONFIG, "layers.1.self_attn[head=2]", "head"), BASE, DONOR))
    base, donor = flat(BASE), flat(DONOR)
    q = "layers.1.self_attn.q_proj.weight"
    o = "layers.1.self_attn.o_proj.weight"
    np.testing.assert_array_equal(patched[q][:, 2], donor[q][:, 2])
    np.testing.assert_array_equal(np.delete(patched[q], 2, axis=1), np.delete(base[q], 2, axis=1))
    np.testing.assert_array_equal(patched[o][2], donor[o][2])
    np.testing.assert_array_equal(np.delete(patched[o], 2, axis=0), np.delete(base[o], 2, axis=0))
    changed = [k for k in base if not np.array_equal(patched[k], base[k])]
    assert sorted(changed) == sorted([q, o])


def test_neuron_and_kv_head_patches() -> None:
    p = Patch.from_selector(CONFIG, "layers.0.mlp[neuron=5]", "neuron")
    patched, base, donor = flat(apply(p, BASE, DONOR)), flat(BASE), flat(DONOR)
    for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
        key = f"layers.0.mlp.{name}.weight"
        np.testing.assert_array_equal(np.take(patched[key], 5, axis), np.take(donor[key], 5, axis))
        assert np.array_equal(np.delete(patched[key], 5, axis), np.delete(base[key], 5, axis))
    kv = flat(apply(Patch.from_selector(CONFIG, "layers.0.self_attn[kv_head=1]", "head"), BASE, DONOR))
    changed = sorted(k for k in base if not np.array_equal(kv[k], base[k]))
    assert changed == ["layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight"]


def test_apply_works_under_jit_vmap_and_grad() -> None:
    patches = [Patch.from_selector(CONFIG, s) for s in ("layers.0.mlp.up_proj", "norm", "layers.1")]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *patches)
    batched = jax.vmap(apply, in_axes=(0, None, None))(stacked, BASE, DONOR)
    for i, p in enumerate(patches):
        one = apply(p, BASE, DONOR)
        for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(batched)):
            np.testing.assert_array_equal(a, b[i])

    @jax.jit
    def loss(alpha: dict) -> jax.Array:
        params = apply(alpha, BASE, DONOR)
        return jaxpatch.forward(CONFIG, params, jnp.array([[1, 2, 3]])).logits.sum()

    zero = Patch.zeros(CONFIG).alpha
    grads = jax.jit(jax.grad(loss))(zero)
    g = grads["layers"][1]["mlp"]["down_proj"]["weight"]
    assert g.shape == (64, 1)
    eps = 1e-3
    bump = jax.tree_util.tree_map(jnp.zeros_like, zero)
    bump["layers"][1]["mlp"]["down_proj"]["weight"] = bump["layers"][1]["mlp"]["down_proj"]["weight"].at[7, 0].set(eps)
    numeric = (loss(bump) - loss(zero)) / eps
    np.testing.assert_allclose(float(g[7, 0]), float(numeric), rtol=5e-2, atol=1e-3)


ALPHA_VALUES = st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=4, max_size=4)


def random_patch(values: list[float]) -> Patch:
    selectors = ["layers.0.mlp.up_proj", "layers.1.self_attn.q_proj", "norm", "embed_tokens"]
    patch = Patch.zeros(CONFIG)
    for value, sel in zip(values, selectors):
        patch = patch.union(Patch.from_selector(CONFIG, sel).scale(value))
    return patch


@settings(max_examples=40, deadline=None)
@given(ALPHA_VALUES, ALPHA_VALUES)
def test_patch_algebra(a_values: list[float], b_values: list[float]) -> None:
    a, b = random_patch(a_values), random_patch(b_values)
    for x, y, u, i in zip(*(jax.tree_util.tree_leaves(p.alpha) for p in (a, b, a | b, a & b))):
        assert np.all(u >= np.maximum(x, y) - 1e-7) and np.all(i <= np.minimum(x, y) + 1e-7)
    # Applying a then b equals applying the composed patch once.
    once = apply(a.then(b), BASE, DONOR)
    twice = apply(b, apply(a, BASE, DONOR), DONOR)
    for x, y in zip(jax.tree_util.tree_leaves(once), jax.tree_util.tree_leaves(twice)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves((~~a).alpha), jax.tree_util.tree_leaves(a.alpha)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    back = Patch.from_json(a.to_json())
    for x, y in zip(jax.tree_util.tree_leaves(back.alpha), jax.tree_util.tree_leaves(a.alpha)):
        np.testing.assert_array_equal(x, y)


def test_full_patch_gives_the_donor_and_empty_gives_the_base() -> None:
    everything = Patch.zeros(CONFIG).complement()
    for x, y in zip(jax.tree_util.tree_leaves(apply(everything, BASE, DONOR)), jax.tree_util.tree_leaves(DONOR)):
        np.testing.assert_allclose(x, y, atol=1e-7)
    for x, y in zip(jax.tree_util.tree_leaves(apply(Patch.zeros(CONFIG), BASE, DONOR)), jax.tree_util.tree_leaves(BASE)):
        np.testing.assert_array_equal(x, y)


def test_patch_json_errors() -> None:
    with pytest.raises(PatchError, match="not a jaxpatch patch"):
        Patch.from_json('{"format": "other"}', "p.json")
    with pytest.raises(PatchError, match="not a jaxpatch patch"):
        Patch.from_json("[1, 2", "p.json")


def test_incompatible_params_name_the_tensor_and_both_shapes() -> None:
    other = jaxpatch.init_params(CONFIG.replace(d_ff=48), jax.random.key(0))
    with pytest.raises(PatchError, match="'layers.0.mlp.down_proj.weight' has shape \\(64, 32\\) in "
                                         "the base and \\(48, 32\\) in the donor"):
        check_compatible(BASE, other)


def test_ablation_targets() -> None:
    zero = ablation_target(BASE)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(zero))
    mean = ablation_target(BASE, "mean", [BASE, DONOR])
    np.testing.assert_allclose(mean["norm"]["weight"], (BASE["norm"]["weight"] + DONOR["norm"]["weight"]) / 2)
    with pytest.raises(PatchError, match="at least one reference"):
        ablation_target(BASE, "mean")


def test_flax_linen_adapter() -> None:
    import flax.linen as nn

    from jaxpatch.adapters import linen_patch

    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    x = jnp.ones((1, 4))
    base = model.init(jax.random.key(0), x)
    donor = model.init(jax.random.key(1), x)
    patch = linen_patch(base, "params.layers_2")
    patched = apply(patch, base, donor)
    np.testing.assert_array_equal(patched["params"]["layers_2"]["kernel"], donor["params"]["layers_2"]["kernel"])
    np.testing.assert_array_equal(patched["params"]["layers_0"]["kernel"], base["params"]["layers_0"]["kernel"])
    assert np.shape(model.apply(patched, x)) == (1, 2)


def test_flax_nnx_adapter() -> None:
    from flax import nnx

    from jaxpatch.adapters import nnx_apply

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.first = nnx.Linear(4, 8, rngs=rngs)
            self.second = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.second(jax.nn.relu(self.first(x)))

    base, donor = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
    patched = nnx_apply(base, donor, "second", strength=1.0)
    np.testing.assert_array_equal(patched.second.kernel[...], donor.second.kernel[...])
    np.testing.assert_array_equal(patched.first.kernel[...], base.first.kernel[...])
    assert patched(jnp.ones((1, 4))).shape == (1, 2)
    # The inputs are untouched.
    assert not np.array_equal(base.second.kernel[...], donor.second.kernel[...])
