"""Logits, residual streams and greedy generation against Hugging Face transformers (golden
fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from golden import FIXTURES, FLOAT32_FIXTURES, reference

import jaxpatch

TOLERANCE = 1e-4


@pytest.mark.parametrize("name", FLOAT32_FIXTURES)
def test_logits_match_transformers(name: str) -> None:
    ref = reference(name)
    model = jaxpatch.load(FIXTURES / name, dtype="float32")
    mask = ref["attention_mask"].astype(bool)
    logits = np.asarray(model(ref["tokens"], mask))
    assert logits.dtype == np.float32
    assert np.abs(logits - ref["logits"])[mask].max() < TOLERANCE


@pytest.mark.parametrize("name", FLOAT32_FIXTURES)
def test_residual_stream_matches_transformers_hidden_states(name: str) -> None:
    ref = reference(name)
    model = jaxpatch.load(FIXTURES / name, dtype="float32")
    mask = ref["attention_mask"].astype(bool)
    out = jaxpatch.forward(model.config, model.params, ref["tokens"], mask, collect=True)
    assert len(out.residuals) == model.config.n_layers
    ours = np.stack([np.asarray(r) for r in out.residuals[:-1]])
    assert np.abs(ours - ref["residuals"])[:, mask].max() < TOLERANCE


@pytest.mark.parametrize("name", [n for n in FLOAT32_FIXTURES if not n.endswith("bf16")])
def test_cached_generation_picks_transformers_greedy_tokens(name: str) -> None:
    from jaxpatch.engine.generation import greedy_generate
    from jaxpatch.prompts import Prompt, prompt_buffer

    ref = reference(name)
    with np.load(FIXTURES / "generation.npz", allow_pickle=False) as data:
        expected = data[name]
    model = jaxpatch.load(FIXTURES / name, dtype="float32")
    prompts = [Prompt(tuple(int(t) for t in row[:length])) for row, length in
               zip(ref["tokens"], ref["attention_mask"].sum(1))]
    tokens, lengths = prompt_buffer(model.config, prompts, expected.shape[1])  # right-padded batch
    generated = np.asarray(greedy_generate(model.config, model.params, tokens, lengths,
                                           expected.shape[1]))
    assert generated.tolist() == expected.tolist()


def test_padding_does_not_change_real_positions() -> None:
    ref = reference("llama-gqa")
    model = jaxpatch.load(FIXTURES / "llama-gqa")
    mask = ref["attention_mask"].astype(bool)
    padded = np.asarray(model(ref["tokens"], mask))
    row, length = 2, int(mask[2].sum())
    alone = np.asarray(model(ref["tokens"][row:row + 1, :length]))
    np.testing.assert_allclose(padded[row, :length], alone[0], atol=1e-5)


def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16() -> None:
    ref = reference("llama-bf16")
    model = jaxpatch.load(FIXTURES / "llama-bf16")
    assert model.config.dtype == "bfloat16"
    assert model.params["layers"][0]["mlp"]["up_proj"]["weight"].dtype == jnp.bfloat16
    mask = ref["attention_mask"].astype(bool)
    ours = np.asarray(model(ref["tokens"], mask))
    ours_error = np.abs(ours - ref["logits"])[mask].max()
    theirs_error = np.abs(ref["logits_bf16"] - ref["logits"])[mask].max()
    assert ours_error <= 2 * theirs_error
    agree = (ours.argmax(-1) == ref["logits_bf16"].argmax(-1))[mask].mean()
    assert agree >= 0.9


def test_transformers_4x_config_format_loads_identically(tmp_path: Path) -> None:
    """transformers 4.x wrote rope_theta and rope_scaling (with "type") at the top level."""
    folder = tmp_path / "llama4x"
    shutil.copytree(FIXTURES / "llama-gqa", folder)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    (folder / "config.json").write_text(json.dumps(config))
    old, new = jaxpatch.load(folder), jaxpatch.load(FIXTURES / "llama-gqa")
    assert old.config == new.config
    assert old.config.rope_scaling is not None and old.config.rope_scaling.kind == "llama3"
    ref = reference("llama-gqa")
    mask = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(old(ref["tokens"], mask)) - ref["logits"])[mask].max() < TOLERANCE


def test_family_features_are_translated() -> None:
    """The fixtures exercise distinct features; check they were read, not defaulted."""
    gpt2 = jaxpatch.load(FIXTURES / "gpt2").config
    assert (gpt2.positional, gpt2.norm, gpt2.tie_embeddings) == ("learned", "layernorm", True)
    qwen2 = jaxpatch.load(FIXTURES / "qwen2").config
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_windows == (None, 4)
    mistral = jaxpatch.load(FIXTURES / "mistral").config
    assert mistral.sliding_windows == (4, 4)
    gemma = jaxpatch.load(FIXTURES / "gemma").config
    assert gemma.scale_embeddings and gemma.norm_weight_offset == 1.0 and gemma.head_dim == 16
    mqa = jaxpatch.load(FIXTURES / "llama-mqa").config
    assert mqa.n_kv_heads == 1 and mqa.rope_scaling.kind == "linear" and mqa.mlp_bias
