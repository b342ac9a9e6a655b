"""Activation patching against a hand-built run from the public forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpatch import (
    Execution,
    JaxpatchError,
    KLDivergence,
    LogProb,
    Prompt,
    VectorAnchor,
    activation_patching,
    forward,
    make_batch,
    prepare,
)
from jaxpatch.metrics import mean_score
from jaxpatch.models.decoder import embed

pytestmark = pytest.mark.slow  # compiles a vmapped forward per granularity


PROMPTS = [Prompt((1, 2, 3, 4, 5), (9, 4)), Prompt((7, 8, 9), (3, 2))]


def score_from(config, params, batch, metric, state, residual, start_layer) -> float:
    out = forward(config, params, batch.tokens, batch.mask, start_layer=start_layer,
                  residual=residual, stop_layer=metric.layer)
    x = out.residual if metric.layer is not None else out.logits
    x = jnp.take_along_axis(x, batch.positions[..., None], axis=1)
    return float(mean_score(metric, x, batch, state))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_module_output_patch_equals_hand_built_run(direction, pair) -> None:
    base, donor = pair(d_ff=16)
    config = base.config
    batch = make_batch(config, PROMPTS, "targets")
    metric = LogProb()
    state = metric.prepare(config, base.params, donor.params, batch)
    result = activation_patching(prepare(base, donor, batch), metric, direction=direction, execution=Execution(progress=False))
    start, source = (base, donor) if direction == "denoise" else (donor, base)
    run = forward(config, start.params, batch.tokens, batch.mask, collect=True)
    source_run = forward(config, source.params, batch.tokens, batch.mask, collect=True)
    # Block 0's MLP output replaced by the source's: embed + start's attention + source's MLP.
    x0 = embed(config, start.params, batch.tokens) + run.modules["layers.0.self_attn"] \
        + source_run.modules["layers.0.mlp"]
    expected = score_from(config, start.params, batch, metric, state, x0, 1)
    got = result.scores[result.names.index("layers.0.mlp.down_proj")]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Replacing the logits gives the source model's score exactly.
    lm_head = result.scores[result.names.index("lm_head")]
    np.testing.assert_allclose(lm_head, result.donor_score if direction == "denoise"
                               else result.base_score, rtol=1e-6)


def test_head_patch_equals_hand_built_run(pair) -> None:
    """Head 1 of block 0: the base run with that head's output (before o_proj) taken from the
    donor, rebuilt from the public block functions."""
    from jaxpatch.models.decoder import linear, mlp, norm

    base, donor = pair(d_ff=16)
    config = base.config
    batch = make_batch(config, PROMPTS)
    metric = VectorAnchor(layer=1)
    state = metric.prepare(config, base.params, donor.params, batch)
    result = activation_patching(prepare(base, donor, batch), metric, granularity="head", selector="layers.0.self_attn[head=1]", execution=Execution(progress=False))
    heads = forward(config, base.params, batch.tokens, batch.mask, collect=True).modules[
        "layers.0.self_attn.heads"]
    donor_heads = forward(config, donor.params, batch.tokens, batch.mask, collect=True).modules[
        "layers.0.self_attn.heads"]
    heads = heads.at[:, :, 1].set(donor_heads[:, :, 1])
    layer = base.params["layers"][0]
    x = embed(config, base.params, batch.tokens)
    x = x + linear(layer["self_attn"]["o_proj"], heads, "bshk,hkd->bsd")
    x = x + mlp(config, layer["mlp"], norm(config, layer["post_attention_layernorm"], x))
    expected = score_from(config, base.params, batch, metric, state, x, 1)
    assert result.names == ["layers.0.self_attn[head=1]"]
    np.testing.assert_allclose(result.scores[0], expected, rtol=1e-5)


def test_granularities_chunks_and_anchor(pair) -> None:
    base, donor = pair(d_ff=16)
    batch = make_batch(base.config, PROMPTS)
    metric = VectorAnchor(layer=0)
    a = activation_patching(prepare(base, donor, batch), metric, granularity="neuron", execution=Execution(chunk_size=5, progress=False))
    b = activation_patching(prepare(base, donor, batch), metric, granularity="neuron", execution=Execution(chunk_size=64, progress=False))
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    assert len(a.names) == 2 * base.config.d_ff and a.method == "activation"
    # Neurons after the anchor block cannot change the readout.
    late = [s for n, s in zip(a.names, a.scores) if n.startswith("layers.1.")]
    np.testing.assert_allclose(late, a.base_score, rtol=1e-6)
    early = np.abs(a.recovery[: base.config.d_ff])
    assert early.max() > 1e-3
    heads = activation_patching(prepare(base, donor, batch), KLDivergence(), granularity="head", execution=Execution(progress=False))
    assert heads.names[0] == "layers.0.self_attn[head=0]" and np.all(np.isfinite(heads.scores))


def test_bad_direction_is_refused(pair) -> None:
    base, donor = pair(d_ff=16)
    with pytest.raises(JaxpatchError, match="direction must be one of denoise, noise, got 'zero'"):
        activation_patching(prepare(base, donor, make_batch(base.config, PROMPTS)), KLDivergence(), direction="zero", execution=Execution(progress=False))


@pytest.mark.parametrize("family", ["gpt2", "gemma", "gemma3_text", "gemma2", "olmo2"])
def test_every_site_is_recorded_and_an_edit_acts_where_it_is_made(family, pair) -> None:
    from jaxpatch.components import activation_sites
    from jaxpatch.engine.programs import clean_sites

    base, _ = pair(family, d_ff=16)
    config = base.config
    batch = make_batch(config, PROMPTS)
    recorded = clean_sites(config, base.params, batch, None)
    assert set(recorded) == set(activation_sites(config))
    assert recorded["layers.1.mlp.neurons"].shape[-1] == config.d_ff
    # Silencing block 1's neurons equals a model whose down_proj weight there is zero.
    silenced = forward(config, base.params, batch.tokens, batch.mask,
                       edit=lambda site, v: v * 0.0 if site == "layers.1.mlp.neurons" else v)
    params = jax.tree_util.tree_map(lambda x: x, base.params)
    down = params["layers"][1]["mlp"]["down_proj"]
    down["weight"] = jnp.zeros_like(down["weight"])
    reference = forward(config, params, batch.tokens, batch.mask)
    np.testing.assert_allclose(silenced.read(None), reference.read(None), atol=1e-5)
    assert not np.allclose(silenced.read(None), forward(config, base.params, batch.tokens,
                                                          batch.mask).read(None), atol=1e-3)


def test_a_whole_block_patched_with_sandwich_norms_carries_the_donors_post_norms() -> None:
    """Gemma 3 adds post-normed outputs to the stream: a one-block model whose donor differs in
    its MLP and both post-norms is fully recovered by patching that block's outputs."""
    from jaxpatch import KLDivergence, Model, ModelConfig, activation_patching, init_params, make_batch
    from jaxpatch.prompts import Prompt

    config = ModelConfig.tiny("gemma3_text", n_layers=1)
    base = init_params(config, jax.random.key(0), scale=0.3)
    donor = jax.tree_util.tree_map(lambda x: x, base)
    layer = donor["layers"][0]
    for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
        layer[name] = {"weight": layer[name]["weight"] + 0.5}
    layer["mlp"] = {k: {"weight": v["weight"] * 1.5} for k, v in layer["mlp"].items()}
    batch = make_batch(config, [Prompt((1, 2, 3, 4)), Prompt((5, 6, 7))])
    result = activation_patching(prepare(Model(config, base), Model(config, donor), batch), KLDivergence(), granularity="layer", execution=Execution(progress=False))
    assert abs(float(result.recovery[0]) - 1.0) < 1e-5
