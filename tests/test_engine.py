"""The sweep engine against the plain loop: patch one candidate, run the plain forward."""

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
    JaxpatchError,
    KLDivergence,
    LogitDiff,
    LogProb,
    MetricError,
    NonFiniteError,
    Patch,
    PatchError,
    Prompt,
    SweepResult,
    VectorAnchor,
    apply,
    make_batch,
    prepare,
    score_patch,
    select,
    sweep,
)
from jaxpatch.metrics import readout
from jaxpatch.patch import ablation_target

pytestmark = pytest.mark.slow  # every test here compiles sweeps (5-20 s each on 2 cores)


PROMPTS = [Prompt((1, 2, 3, 4, 5), (9,), (8,)), Prompt((7, 8, 9), (3,), (4,)),
           Prompt((11, 12, 13, 14), (5,), (6,))]


def reference_scores(base, donor, batch, metric, components, direction="denoise") -> np.ndarray:
    state = metric.prepare(base.config, base.params, donor.params, batch)
    return np.array([score_patch(base, donor, Patch.from_components(base.config, [c]), batch, metric,
                                 direction, state) for c in components])


@pytest.mark.parametrize("family, granularity, metric, direction", [
    ("llama", "module", VectorAnchor(layer=1), "denoise"),
    ("llama", "head", VectorAnchor(layer=1), "noise"),
    ("qwen2", "neuron", VectorAnchor(layer=0), "denoise"),
    ("gpt2", "module", KLDivergence(), "denoise"),
    ("gemma", "layer", LogitDiff(), "noise"),
    ("gemma3_text", "module", VectorAnchor(layer=1), "denoise"),
    ("gemma3_text", "head", LogitDiff(), "noise"),
    ("qwen3", "head", VectorAnchor(layer=1), "denoise"),
    ("gemma2", "module", LogitDiff(), "denoise"),
    ("olmo2", "module", KLDivergence(), "noise"),
    ("olmo2", "head", VectorAnchor(layer=1), "denoise"),
    ("phi3", "neuron", LogitDiff(), "denoise"),
])
def test_sweep_equals_patching_each_candidate_alone(family, granularity, metric, direction, pair) -> None:
    base, donor = pair(family, d_ff=16)
    batch = make_batch(base.config, PROMPTS)
    result = sweep(prepare(base, donor, batch), metric, granularity=granularity, direction=direction, execution=Execution(progress=False))
    components = select(base.config, None, granularity)
    assert result.names == [c.name for c in components]
    expected = reference_scores(base, donor, batch, metric, components, direction)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, granularity, metric, materialize", [
    ("llama", "module", KLDivergence(), None),
    ("gemma3_text", "module", VectorAnchor(layer=1), None),
    ("gemma3_text", "neuron", KLDivergence(), False),
    ("gpt2", "head", VectorAnchor(layer=1), False),
    ("qwen2", "neuron", VectorAnchor(layer=1), True),
])
def test_bfloat16_sweep_agrees_with_patching_alone(family, granularity, metric, materialize,
                                                   pair) -> None:
    """In bfloat16 the sweep and the one-at-a-time reference are different programs; both
    round every operation as written (`jaxpatch.rounding`), and a patched weight at alpha 1 is
    the donor's own, so the endpoints agree bitwise and every score within 1% of the span (a
    lightly fine-tuned pair: the hardest case, the span is near bfloat16's resolution)."""
    base, donor = pair(family, d_ff=16, dtype="bfloat16", perturbation=0.05)
    batch = make_batch(base.config, PROMPTS)
    result = sweep(prepare(base, donor, batch), metric, granularity=granularity, execution=Execution(materialize=materialize, progress=False))
    components = select(base.config, None, granularity)
    expected = reference_scores(base, donor, batch, metric, components)
    state = metric.prepare(base.config, base.params, donor.params, batch)
    zero, full = (score_patch(base, donor, p, batch, metric, state=state)
                  for p in (Patch.zeros(base.config), Patch.from_selector(base.config, "*")))
    assert (result.base_score, result.donor_score) == (zero, full)
    assert np.abs(result.scores - expected).max() <= 0.01 * abs(full - zero)


def test_programs_round_as_operations_run_one_by_one(pair) -> None:
    """A jitted bfloat16 forward gives the bits of the same code run operation by operation
    (XLA's excess precision off); with it on, fused chains would round differently."""
    base, _ = pair("gemma3_text", dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, base.config.vocab_size, (4, 9)))
    jitted = np.asarray(base(tokens))
    with jax.disable_jit():
        one_by_one = np.asarray(jaxpatch.forward(base.config, base.params, tokens).logits)
    np.testing.assert_array_equal(jitted, one_by_one)
    fused = np.asarray(jax.jit(lambda p, t: jaxpatch.forward(base.config, p, t).logits)(
        base.params, tokens))
    assert not np.array_equal(fused, one_by_one)  # what the option prevents, on this model


def test_chunk_size_and_weight_layout_do_not_change_scores(pair) -> None:
    base, donor = pair("llama", d_ff=16)
    batch = make_batch(base.config, PROMPTS, "prompt")
    metric = VectorAnchor(layer=1)
    results = [sweep(prepare(base, donor, batch), metric, granularity="neuron", execution=Execution(chunk_size=chunk, materialize=dense, progress=False)).scores
               for chunk, dense in ((None, None), (1, True), (5, False), (7, True))]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-5)


def test_components_after_the_anchor_are_exactly_unchanged(pair) -> None:
    base, donor = pair("llama")
    batch = make_batch(base.config, PROMPTS)
    result = sweep(prepare(base, donor, batch), VectorAnchor(layer=0), execution=Execution(progress=False))
    after = [n for n in result.names if n.startswith("layers.1") or n in ("norm", "lm_head")]
    assert set(result.skipped) == set(after)
    effect = dict(zip(result.names, result.effect))
    assert all(effect[n] == 0.0 for n in after)
    assert any(abs(effect[n]) > 1e-3 for n in result.names if n.startswith("layers.0"))
    assert result.base_score != result.donor_score


def test_logit_metrics_cover_the_final_modules_and_the_embedding(pair) -> None:
    base, donor = pair("llama")
    batch = make_batch(base.config, PROMPTS, "targets")
    metric = LogProb()
    chosen = select(base.config, "embed_tokens | norm | lm_head | layers.1.mlp.down_proj", "module")
    result = sweep(prepare(base, donor, batch), metric, candidates=chosen, execution=Execution(progress=False))
    np.testing.assert_allclose(result.scores, reference_scores(base, donor, batch, metric, chosen),
                               atol=1e-5)


def test_custom_multi_layer_patches(pair) -> None:
    base, donor = pair("mistral", sliding_windows=(2, None))
    batch = make_batch(base.config, PROMPTS)
    config = base.config
    patches = {
        "both down_proj": Patch.from_selector(config, "layers.*.mlp.down_proj"),
        "half of layer 0": Patch.from_selector(config, "layers.0").scale(0.5),
        "heads 0 and neurons": Patch.from_selector(config, "layers.0.self_attn[head=0]", "head")
        | Patch.from_selector(config, "layers.1.mlp[neuron=0-9]", "neuron"),
    }
    metric = VectorAnchor(layer=1)
    result = sweep(prepare(base, donor, batch), metric, candidates=patches, execution=Execution(progress=False))
    state = metric.prepare(config, base.params, donor.params, batch)
    expected = [score_patch(base, donor, p, batch, metric, state=state) for p in patches.values()]
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)


def test_ablation_directions(pair) -> None:
    base, donor = pair("llama")
    batch = make_batch(base.config, PROMPTS)
    metric = VectorAnchor(layer=1)
    chosen = select(base.config, "layers.*.mlp.*", "module")
    state = metric.prepare(base.config, base.params, donor.params, batch)
    result = sweep(prepare(base, donor, batch), metric, candidates=chosen, direction="zero", execution=Execution(progress=False))
    zero = ablation_target(donor.params)
    expected = [float(metric.score(readout(
        base.config, apply(Patch.from_components(base.config, [c]), donor.params, zero), batch, 1),
        batch, state).mean()) for c in chosen]
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    mean = sweep(prepare(base, donor, batch), metric, candidates=chosen, direction="mean", references=[base.params, donor.params], execution=Execution(progress=False))
    assert not np.allclose(mean.scores, result.scores)


def test_continuation_positions_teacher_force_the_donors_text(pair) -> None:
    base, donor = pair("llama")
    from jaxpatch.prompts import greedy_continuations

    continuations = greedy_continuations(donor.config, donor.params, PROMPTS, 3)
    # Greedy decoding by hand, one token at a time, with the plain model call.
    for prompt, generated in zip(PROMPTS, continuations):
        tokens = list(prompt.tokens)
        for _ in range(3):
            tokens.append(int(np.argmax(np.asarray(donor([tokens]))[0, -1])))
        assert generated == tokens[len(prompt.tokens):]
    batch = make_batch(base.config, PROMPTS, "continuation", continuations)
    assert batch.positions.shape == (3, 3) and batch.positions[1].tolist() == [3, 4, 5]
    metric = VectorAnchor(layer=1)
    chosen = select(base.config, "layers.0.self_attn", "head")
    result = sweep(prepare(base, donor, batch), metric, candidates=chosen, execution=Execution(progress=False))
    np.testing.assert_allclose(result.scores, reference_scores(base, donor, batch, metric, chosen),
                               atol=1e-5)


def test_bad_pairs_and_values_are_refused(pair) -> None:
    base, donor = pair("llama")
    batch = make_batch(base.config, PROMPTS)
    other = jaxpatch.Model(base.config.replace(d_ff=48),
                           jaxpatch.init_params(base.config.replace(d_ff=48), jax.random.key(2)))
    with pytest.raises(PatchError, match="has shape \\(64, 32\\) in the base and \\(48, 32\\) in the donor"):
        sweep(prepare(base, other, batch), VectorAnchor(layer=1), execution=Execution(progress=False))
    theta = jaxpatch.Model(base.config.replace(rope_theta=500.0), donor.params)
    with pytest.raises(JaxpatchError, match="differ in rope_theta"):
        sweep(prepare(base, theta, batch), VectorAnchor(layer=1), execution=Execution(progress=False))
    poisoned = jax.tree_util.tree_map(lambda x: x, donor.params)
    poisoned["layers"][1]["mlp"]["up_proj"]["weight"] = poisoned["layers"][1]["mlp"]["up_proj"]["weight"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match="donor tensor 'layers.1.mlp.up_proj.weight' holds NaN or Inf"):
        sweep(prepare(base, jaxpatch.Model(base.config, poisoned), batch), VectorAnchor(layer=1), execution=Execution(progress=False))
    with pytest.raises(MetricError, match="zero length: donor and base do not differ"):
        sweep(prepare(base, base, batch), VectorAnchor(layer=1), execution=Execution(progress=False))
    with pytest.raises(MetricError, match="anchor layer 2 is out of range"):
        sweep(prepare(base, donor, batch), VectorAnchor(layer=2), execution=Execution(progress=False))


def test_result_serialization_round_trip(tmp_path: Path, pair) -> None:
    base, donor = pair("llama")
    result = sweep(prepare(base, donor, make_batch(base.config, PROMPTS)), VectorAnchor(layer=1), granularity="layer", execution=Execution(progress=False))
    data = json.loads(json.dumps(result.to_dict()))
    back = SweepResult.from_dict(data)
    np.testing.assert_array_equal(back.scores, result.scores)
    assert set(data) >= {"metric", "direction", "readout_layer", "positions", "base_score",
                         "donor_score", "components", "timing", "inputs"}
    assert set(data["timing"]) >= {"wall_s", "compile_s", "candidates_per_s"}
    assert result.to_csv().splitlines()[0] == "name,score,recovery,effect"
    np.testing.assert_allclose(result.recovery, (result.scores - result.base_score)
                               / (result.donor_score - result.base_score))
