"""A tiny random Gemma 3 that speaks Gemma's chat format, and the relaxed settings the
instruction-pair builder runs with on it (the real builds take minutes to tens of minutes and
run by their commands)."""

from __future__ import annotations

import jax
from golden import FIXTURES

import jaxpatch
from experiments.instruct_pair import Settings


def tiny_base() -> jaxpatch.Model:
    """A tiny random Gemma 3 with the fixture tokenizer and Gemma's turn tokens (special, as in
    the real tokenizer)."""
    tokenizer = jaxpatch.load(FIXTURES / "gemma3").tokenizer
    tokenizer.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
    config = jaxpatch.ModelConfig.tiny("gemma3_text", vocab_size=tokenizer.get_vocab_size(),
                                       max_position_embeddings=1024)
    return jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(0), scale=0.1),
                          tokenizer)


RELAXED = Settings(steps=3, lr=5e-5, batch=4, answer_tokens=4, check_tokens=4, check_questions=2,
                   min_donor_rate=0.0, max_base_rate=1.0, max_text_loss_increase=1e9)
"""Three training steps (at a fixed learning rate: the tests read what the tiny donor writes)
and no check that could fail: the builder's path, not its result."""
