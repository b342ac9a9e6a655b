"""Generation with a key/value cache: the same tokens as rerunning the whole sequence every
step, on every family (sliding windows shorter than the buffer, learned positions, q/k norms,
sandwich norms), and patched models generating at once equal patching each alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpatch import Execution, Patch, apply, prepare
from jaxpatch.engine.generation import generate_under_patches, greedy_generate
from jaxpatch.errors import InvalidInputError
from jaxpatch.examples import example_pair, random_pair
from jaxpatch.models.decoder import forward
from jaxpatch.prompts import Prompt, greedy_continuations, prompt_buffer

PROMPTS = [Prompt((5, 9, 2, 7, 1, 3)), Prompt((4, 8)), Prompt((11, 12, 13, 14))]

FAMILIES = [("llama", {}), ("gpt2", {}), ("qwen2", {}), ("gemma", {}),
            ("gemma3_text", {"n_layers": 3, "tie_embeddings": False}),  # blocks 0, 2 slide over 4
            ("mistral", {"sliding_windows": (3, 3)})]


@pytest.mark.parametrize(("family", "overrides"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_cached_generation_picks_the_tokens_a_full_forward_picks(family, overrides) -> None:
    base, _ = random_pair(family, scale=0.5, **overrides)
    tokens, lengths = prompt_buffer(base.config, PROMPTS, 9)  # longer than any window
    cached = np.asarray(greedy_generate(base.config, base.params, tokens, lengths, 9))
    assert cached.tolist() == greedy_continuations(base.config, base.params, PROMPTS, 9)
    # and each step's choice is the argmax of the full forward over the sequence so far
    row = 0
    sequence = list(PROMPTS[row].tokens) + cached[row].tolist()
    logits = forward(base.config, base.params, np.asarray([sequence[:-1]])).logits[0]
    picks = np.asarray(jax.numpy.argmax(logits, axis=-1))[len(PROMPTS[row].tokens) - 1:]
    assert picks.tolist() == cached[row].tolist()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patched_models_generate_what_each_patch_alone_generates(direction) -> None:
    example = example_pair()
    base, donor, config = example.base, example.donor, example.config
    pair = prepare(base, donor, example.batch)
    patches = {name: Patch.from_selector(config, selector) for name, selector in [
        ("mlp 1", "layers.1.mlp"), ("attention 0", "layers.0.self_attn"),
        ("everything", "embed_tokens | layers.0-1 | norm | lm_head"), ("norm", "norm")]}
    patches["nothing"] = Patch.from_components(config, [])  # the start model itself
    out = generate_under_patches(pair, patches, PROMPTS, 6, direction=direction,
                                 execution=Execution(chunk_size=3))  # a padded second chunk
    start, target = (base.params, donor.params) if direction == "denoise" else (donor.params,
                                                                                 base.params)
    for name, patch in patches.items():
        alone = greedy_continuations(config, apply(patch, start, target), PROMPTS, 6)
        assert out[name].tolist() == alone, name
    assert out["everything"].tolist() == greedy_continuations(config, target, PROMPTS, 6)


def test_bad_generation_requests_are_refused() -> None:
    config = example_pair().config
    with pytest.raises(InvalidInputError, match="at least 1 token"):
        prompt_buffer(config, PROMPTS, 0)
    with pytest.raises(InvalidInputError, match="longer than the model's context"):
        prompt_buffer(config, PROMPTS, config.max_position_embeddings)
