"""Function-preserving decoys: weights move far, logits do not."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from experiments.decoys import rescale
from jaxpatch.examples import EXAMPLE_PROMPTS, random_pair
from jaxpatch.pair import delta_norms


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
                                    "gemma3_text", "olmo2"])
@pytest.mark.parametrize("attention", ["values", "queries"])
def test_rescaling_keeps_every_logit_and_moves_the_weights(family, attention) -> None:
    model, _ = random_pair(family)
    config = model.config
    if attention == "queries" and config.qk_norm is not None:  # the norms undo it: refused
        with pytest.raises(jaxpatch.JaxpatchError, match="normalizes queries and keys"):
            rescale(config, model.params, "layers.0.self_attn[kv_head=0]", 8.0, attention)
        return
    params = model.params
    if config.qkv_bias:  # give the biases something to rescale
        layer = params["layers"][0]["self_attn"]
        for name in ("q_proj", "k_proj", "v_proj"):
            layer[name]["bias"] = layer[name]["bias"] + 0.3
    last_kv = config.n_kv_heads - 1  # Gemma's tiny config is MQA: one key/value head
    selector = f"layers.1.mlp[neuron=0-7] | layers.0.self_attn[kv_head={last_kv}]"
    moved = rescale(config, params, selector, 8.0, attention)
    batch = jaxpatch.make_batch(config, EXAMPLE_PROMPTS)
    before = jaxpatch.forward(config, params, batch.tokens, batch.mask).read(None)
    after = jaxpatch.forward(config, moved, batch.tokens, batch.mask).read(None)
    scale = float(jnp.abs(before).max())
    np.testing.assert_allclose(after, before, atol=2e-5 * scale)
    # |dW| sees large moves exactly where the rewrite happened, and nowhere else.
    modules = jaxpatch.components(config, "module")
    norms = dict(zip([c.name for c in modules], delta_norms(config, params, moved, modules)))
    touched = {"layers.1.mlp.up_proj", "layers.1.mlp.down_proj",
               *({"layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj"} if attention == "values"
                 else {"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"})}
    assert {n for n, v in norms.items() if v > 0} == touched
    assert norms["layers.1.mlp.up_proj"] > 1.0


def test_neuron_patches_of_a_rescaled_donor_score_as_before() -> None:
    """Moving a neuron's up column and down row together, the rescaled donor is the donor."""
    base, donor = random_pair("llama", d_ff=16, perturbation=0.1)
    config = base.config
    rewritten = jaxpatch.Model(config, rescale(config, donor.params, "layers.1.mlp[neuron=0-3]", 16.0))
    batch = jaxpatch.make_batch(config, EXAMPLE_PROMPTS)
    metric = jaxpatch.VectorAnchor(layer=1)
    state, _, _ = jaxpatch.endpoint_scores(config, base, donor, batch, metric)
    for n in range(4):
        patch = jaxpatch.Patch.from_selector(config, f"layers.1.mlp[neuron={n}]", "neuron")
        plain = jaxpatch.score_patch(base, donor, patch, batch, metric, state=state)
        decoyed = jaxpatch.score_patch(base, rewritten, patch, batch, metric, state=state)
        assert decoyed == pytest.approx(plain, abs=1e-4)


def test_bad_decoys_are_refused() -> None:
    gpt2, _ = random_pair("gpt2")
    with pytest.raises(jaxpatch.JaxpatchError, match="only in a gated MLP"):
        rescale(gpt2.config, gpt2.params, "layers.0.mlp[neuron=1]", 2.0)
    llama, _ = random_pair("llama")
    with pytest.raises(jaxpatch.JaxpatchError, match="names no MLP neuron or key/value head"):
        rescale(llama.config, llama.params, "norm", 2.0)
    with pytest.raises(jaxpatch.JaxpatchError, match="finite and nonzero"):
        rescale(llama.config, llama.params, "layers.0.mlp[neuron=1]", 0.0)
