"""Gradient attribution against exact patching and against its own definitions."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import (
    Execution,
    KLDivergence,
    Patch,
    Prompt,
    VectorAnchor,
    Verification,
    alpha_gradients,
    apply,
    attribute,
    endpoint_scores,
    localize,
    make_batch,
    prepare,
    score_patch,
    select,
    spearman,
)
from jaxpatch.attribution import planned_gradient_bytes
from jaxpatch.examples import random_pair
from jaxpatch.metrics import readout

pytestmark = pytest.mark.slow

BASE, DONOR = random_pair("qwen2", perturbation=0.05, d_ff=16)
CONFIG = BASE.config
BATCH = make_batch(CONFIG, [Prompt((1, 2, 3, 4, 5)), Prompt((7, 8, 9)), Prompt((3, 1, 4, 1))])
METRIC = VectorAnchor(layer=1)


def test_first_order_is_the_derivative_of_exact_patching() -> None:
    """(score(patch at strength e) - score(start)) / e -> the attribution, per component."""
    result = attribute(prepare(BASE, DONOR, BATCH), METRIC, granularity="head")
    state = METRIC.prepare(CONFIG, BASE.params, DONOR.params, BATCH)
    items = select(CONFIG, None, "head")
    eps = 1e-2
    for i in (0, 3, 5, 9):
        patch = Patch.from_components(CONFIG, [items[i]]).scale(eps)
        hi = score_patch(BASE, DONOR, patch, BATCH, METRIC, state=state)
        lo = score_patch(BASE, DONOR, patch.scale(-1.0), BATCH, METRIC, state=state)
        central = (hi - lo) / (2 * eps)
        np.testing.assert_allclose(result.scores[i] - result.base_score, central, rtol=2e-2, atol=2e-4)


def test_first_order_equals_weight_gradient_dotted_with_the_difference() -> None:
    state = METRIC.prepare(CONFIG, BASE.params, DONOR.params, BATCH)

    def score(params: dict) -> jax.Array:
        return jnp.mean(METRIC.score(readout(CONFIG, params, BATCH, 1), BATCH, state))

    grad_w = jaxpatch.flatten_params(jax.grad(score)(BASE.params))
    delta = {k: np.asarray(DONOR_FLAT[k]) - np.asarray(BASE_FLAT[k]) for k in BASE_FLAT}
    result = attribute(prepare(BASE, DONOR, BATCH), METRIC, granularity="neuron", selector="layers.0")
    for n, value in zip(range(16), result.scores - result.base_score):
        expected = sum(float(np.take(np.asarray(grad_w[f"layers.0.mlp.{m}.weight"]) * delta[f"layers.0.mlp.{m}.weight"], n, axis).sum())
                       for m, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)))
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-6)


BASE_FLAT = jaxpatch.flatten_params(BASE.params)
DONOR_FLAT = jaxpatch.flatten_params(DONOR.params)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_integrated_gradients_are_complete(direction: str) -> None:
    gaps = []
    for steps in (2, 16):
        result = attribute(prepare(BASE, DONOR, BATCH), METRIC, granularity="module", method="integrated-gradients", steps=steps, direction=direction)
        completeness = result.extra["completeness"]
        gaps.append(completeness["relative_gap"])
        # Modules partition every coefficient, so their effects sum to the whole recovery.
        np.testing.assert_allclose(result.effect.sum(), 1.0, atol=5 * completeness["relative_gap"] + 1e-4)
    assert gaps[1] < 1e-3 and gaps[1] < gaps[0]


# Qwen3's per-head q/k norms are Gemma 3's, Phi-3's fused weights are split on loading: what
# differs in the backward pass is Gemma 2's softcapping and OLMo 2's norm layout.
@pytest.mark.parametrize("family", ["gpt2", "gemma", "gemma3_text", "gemma2", "olmo2"])
def test_first_order_equals_the_gradient_of_patching_for_every_leaf(family: str) -> None:
    """Every coefficient: matmuls, norm weights (with Gemma's offset), biases, tied embeddings,
    learned positions (the Llama layout is the module-level pair's)."""
    config = jaxpatch.ModelConfig.tiny(family)
    base = jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(0), scale=0.2))
    donor = jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(1), scale=0.2))
    batch = make_batch(config, [Prompt((1, 2, 3, 4)), Prompt((5, 6))])
    metric = KLDivergence()
    state = metric.prepare(config, base.params, donor.params, batch)

    def patched_score(alpha: dict) -> jax.Array:
        params = apply(alpha, base.params, donor.params)
        return jnp.mean(metric.score(jaxpatch.forward(config, params, batch.tokens, batch.mask,
                                                      readout_positions=batch.positions).logits,
                                     batch, state))

    want = jax.jit(jax.grad(patched_score))(Patch.zeros(config).alpha)
    for remat in (False, True):
        got = alpha_gradients(prepare(base, donor, batch), metric, execution=Execution(remat=remat))
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                                jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6,
                                       err_msg=f"remat={remat} {jax.tree_util.keystr(path)}")


def test_bfloat16_attribution_follows_float32() -> None:
    """The probe's backward keeps each cotangent in its primal's dtype and sums in float32."""
    def cast(model: jaxpatch.Model) -> jaxpatch.Model:
        return jaxpatch.Model(CONFIG, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16),
                                                             model.params))

    full = attribute(prepare(BASE, DONOR, BATCH), METRIC, granularity="module")
    half = attribute(prepare(cast(BASE), cast(DONOR), BATCH), METRIC, granularity="module")
    assert np.all(np.isfinite(half.effect))
    assert spearman(full.effect, half.effect) > 0.95
    np.testing.assert_allclose(half.effect, full.effect, atol=0.05 * np.abs(full.effect).max())


def test_integrated_gradient_steps_run_in_batches_alike() -> None:
    one = alpha_gradients(prepare(BASE, DONOR, BATCH), METRIC, method="integrated-gradients", steps=4)
    for step_batch in (3, 4):  # uneven and whole
        batched = alpha_gradients(prepare(BASE, DONOR, BATCH), METRIC, method="integrated-gradients", steps=4, execution=Execution(step_batch=step_batch))
        for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(batched)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    with pytest.raises(jaxpatch.JaxpatchError, match="step_batch"):
        alpha_gradients(prepare(BASE, DONOR, BATCH), METRIC, method="integrated-gradients", execution=Execution(step_batch=0))


@pytest.mark.parametrize("metric, method", [(KLDivergence(), "first-order"),
                                            (VectorAnchor(layer=0), "integrated-gradients")],
                         ids=["kl", "anchor"])
def test_prompt_chunks_and_remat_do_not_change_gradients(metric, method: str) -> None:
    """KL's state is per prompt, so chunking must slice it; the anchor stops before the last
    block, whose coefficients then have no effect."""
    full = alpha_gradients(prepare(BASE, DONOR, BATCH), metric, method=method, steps=3)
    chunked = alpha_gradients(prepare(BASE, DONOR, BATCH), metric, method=method, steps=3, execution=Execution(prompt_batch=2, remat=True))
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(chunked)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    if metric.layer == 0:
        for leaf in jax.tree_util.tree_leaves(chunked["layers"][1]):
            assert not np.any(np.asarray(leaf))


def _planned_bytes(n_layers: int, remat: bool) -> int:
    """Planned gradient memory on a model of this depth."""
    config = jaxpatch.ModelConfig.tiny("llama", n_layers=n_layers)
    base = jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(0), scale=0.2))
    donor = jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(1), scale=0.2))
    batch = make_batch(config, [Prompt(tuple(range(1, 49)))] * 8)
    return planned_gradient_bytes(prepare(base, donor, batch), KLDivergence(), remat=remat)


def test_remat_keeps_gradient_memory_flat_in_depth() -> None:
    blockwise_2 = _planned_bytes(2, remat=True)
    blockwise_8 = _planned_bytes(8, remat=True)
    assert blockwise_8 < 1.2 * blockwise_2
    # The one-program gradient holds every block's activations for the backward pass.
    assert blockwise_8 < _planned_bytes(8, remat=False) / 4


def test_localize_verifies_the_shortlist_and_reports_recall() -> None:
    report = localize(prepare(BASE, DONOR, BATCH), METRIC, granularity="neuron", verify=Verification(top_k=5, controls=4, exhaustive=True, seed=3), execution=Execution(progress=False))
    attribution = dict(zip(report.attribution.names, np.abs(report.attribution.effect)))
    top = sorted(attribution, key=lambda n: -attribution[n])[:5]
    assert report.shortlist == top
    assert len(report.controls) == 4 and not set(report.controls) & set(top)
    assert sorted(report.exact.names) == sorted(top + report.controls)
    # Independently: every neuron patched alone through the plain forward.
    state, base_score, donor_score = endpoint_scores(CONFIG, BASE, DONOR, BATCH, METRIC)
    neurons = select(CONFIG, None, "neuron")
    exact = {c.name: score_patch(BASE, DONOR, Patch.from_components(CONFIG, [c]), BATCH, METRIC,
                                 state=state) for c in neurons}
    for name, score in zip(report.exact.names, report.exact.scores):
        assert score == pytest.approx(exact[name], abs=1e-5)
    truth = sorted(exact, key=lambda n: -abs(exact[n] - base_score))[:5]
    assert report.recall == pytest.approx(len(set(truth) & set(top)) / 5)
    # Spearman on the verified set from rank positions (no ties among these floats).
    signed = dict(zip(report.attribution.names, report.attribution.effect))
    verified = report.exact.names
    approx_effect = np.array([signed[n] for n in verified])
    exact_effect = np.array([(exact[n] - base_score) / (donor_score - base_score) for n in verified])
    ranks = [np.argsort(np.argsort(x)) for x in (approx_effect, exact_effect)]
    assert report.spearman == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-9)
    again = localize(prepare(BASE, DONOR, BATCH), METRIC, granularity="neuron", verify=Verification(top_k=5, controls=4, seed=3), execution=Execution(progress=False))
    assert again.controls == report.controls
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_cli_attribute_and_localize(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jaxpatch.cli import main

    base, donor = tmp_path / "base", tmp_path / "donor"
    jaxpatch.save(BASE, base)
    jaxpatch.save(DONOR, donor)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"tokens": [1, 2, 3, 4]}\n{"tokens": [5, 6, 7]}\n')
    run = ["--base", str(base), "--donor", str(donor), "--prompts", str(prompts), "--no-progress"]
    assert main(["attribute", *run, "--method", "integrated-gradients", "--steps", "8",
                 "--out", str(tmp_path / "a")]) == 0
    data = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert data["method"] == "integrated-gradients" and "completeness" in data["extra"]
    assert "completeness: attributions sum to" in capsys.readouterr().out
    assert main(["localize", *run, "--top-k", "3", "--controls", "2", "--out", str(tmp_path / "l")]) == 0
    report = json.loads((tmp_path / "l" / "localize.json").read_text())
    assert len(report["shortlist"]) == 3 and len(report["controls"]) == 2
    assert report["recall"] is None
