"""GGUF in: the reader against hostile files, the tiny fixture and the real google/gemma-3-270m
file against transformers' own GGUF loader (golden outputs from scripts/make_gguf_fixtures.py)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from golden import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxpatch
from jaxpatch.errors import (
    CorruptCheckpointError,
    JaxpatchError,
    UnsupportedArchitectureError,
    UnsupportedConfigError,
)
from jaxpatch.io.gguf import SUPPORTED_TYPES, read_gguf, read_gguf_tensor

TINY = FIXTURES / "gemma3.gguf"


def _texts(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}-texts.json").read_text())


def test_tiny_file_uses_every_supported_type() -> None:
    types = {t.type for t in read_gguf(TINY).tensors.values()}
    assert types == set(SUPPORTED_TYPES)


def test_tiny_logits_match_transformers_gguf_load() -> None:
    with np.load(FIXTURES / "gemma3-gguf.npz") as ref:
        tokens, mask, expected = ref["tokens"], ref["attention_mask"].astype(bool), ref["logits"]
    model = jaxpatch.load(TINY)
    assert model.config.family == "gemma3_text" and model.config.dtype == "float32"
    logits = np.asarray(model(tokens, mask))
    assert np.abs(logits - expected)[mask].max() < 1e-4


def test_tiny_tokenizer_matches_transformers() -> None:
    texts = _texts("gemma3-gguf")
    model = jaxpatch.load(TINY)
    ours = [model.tokenizer.encode(t).ids for t in texts["texts"]]
    assert ours == texts["ids"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_byte_level_architectures_match_transformers_gguf_load(arch: str, tmp_path: Path) -> None:
    """Llama (query and key rows in llama.cpp's order), Qwen2 (biases, tied) and Qwen3 (q/k
    norms): logits and token ids as transformers' GGUF loader gives them, and a converted
    folder that loads with the same logits."""
    with np.load(FIXTURES / f"{arch}-gguf.npz") as ref:
        tokens, mask, expected = ref["tokens"], ref["attention_mask"].astype(bool), ref["logits"]
    model = jaxpatch.load(FIXTURES / f"{arch}.gguf")
    assert model.config.family == arch
    assert np.abs(np.asarray(model(tokens, mask)) - expected)[mask].max() < 1e-4
    texts = _texts(f"{arch}-gguf")
    ours = [model.tokenizer.encode(t, add_special_tokens=False).ids for t in texts["texts"]]
    assert ours == texts["ids"]
    jaxpatch.save(model, tmp_path / "hf")
    again = jaxpatch.load(tmp_path / "hf")
    assert np.array_equal(np.asarray(again(tokens, mask)), np.asarray(model(tokens, mask)))


def test_llama_cpp_row_order_is_undone() -> None:
    """Without undoing llama.cpp's reordering of query and key rows the logits are far off."""
    from jaxpatch.io.gguf_model import unpermute_rows

    rows = np.arange(16.0).reshape(8, 2)
    permuted = rows.reshape(2, 2, 2, 2).swapaxes(1, 2).reshape(8, 2)  # llama.cpp's permute, 2 heads
    assert np.array_equal(unpermute_rows(permuted, 2), rows)
    assert not np.array_equal(permuted, rows)


def test_a_chosen_dtype_is_applied_after_dequantizing() -> None:
    full, half = jaxpatch.load(TINY), jaxpatch.load(TINY, dtype="bfloat16")
    assert half.config.dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(half.params)} == {"bfloat16"}
    norm = full.params["layers"][0]["input_layernorm"]["weight"]
    assert np.array_equal(np.asarray(half.params["layers"][0]["input_layernorm"]["weight"]),
                          np.asarray(norm.astype("bfloat16")))
    with pytest.raises(UnsupportedConfigError, match="dtype"):
        jaxpatch.load(TINY, dtype="float64")


def test_q8_0_dequantized_by_hand_equals_the_reader() -> None:
    header = read_gguf(TINY)
    info = header.tensors["blk.0.attn_v.weight"]
    assert info.type == "Q8_0"
    raw = np.frombuffer(TINY.read_bytes()[info.offset:info.offset + info.nbytes], np.uint8)
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    values = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * scale
    assert np.array_equal(values.reshape(info.shape), read_gguf_tensor(header, info.name))


def test_norms_lose_llama_cpp_plus_one() -> None:
    header = read_gguf(TINY)
    stored = read_gguf_tensor(header, "blk.1.ffn_norm.weight")
    model = jaxpatch.load(TINY)
    ours = np.asarray(model.params["layers"][1]["pre_feedforward_layernorm"]["weight"])
    assert np.allclose(ours, stored - 1.0)


def test_convert_writes_a_folder_that_loads_with_the_same_logits(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "jaxpatch.cli", "convert", str(TINY), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    a, b = jaxpatch.load(TINY), jaxpatch.load(out)
    tokens = [[2, 15, 40, 7, 9]]
    assert np.array_equal(np.asarray(a(tokens)), np.asarray(b(tokens)))
    assert b.encode(["the cat"])[0].tolist() == a.encode(["the cat"])[0].tolist()


# ------------------------------------------------------------------------- hostile files

def _header_end(data: bytes) -> int:
    """Where the tiny file's data section starts (the header is everything before)."""
    tensors = read_gguf(TINY).tensors.values()
    return min(t.offset for t in tensors)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


def _first_tensor_entry(data: bytes) -> int:
    """Byte offset of the first tensor entry's name length."""
    name = b"token_embd.weight"
    return data.index(struct.pack("<Q", len(name)) + name)


@pytest.mark.parametrize("case, message", [
    ("truncated", "past the end"),
    ("magic", "GGUF magic"),
    ("tensor_count", "more than the rest of the file"),
    ("offset", "past the end of the file"),
    ("overlap", "overlap"),
    ("type", "unknown ggml type"),
    ("dims", "dimensions"),
])
def test_lying_files_are_refused_in_one_line(tmp_path: Path, case: str, message: str) -> None:
    data = bytearray(TINY.read_bytes())
    entry = _first_tensor_entry(data)
    name_len = 8 + len("token_embd.weight")
    dims_at = entry + name_len + 4  # after n_dims
    type_at = dims_at + 16          # two dimensions
    offset_at = type_at + 4
    if case == "truncated":
        data = data[:entry + 5]
    elif case == "magic":
        data[:4] = b"GGUX"
    elif case == "tensor_count":
        data[8:16] = struct.pack("<Q", 1 << 50)
    elif case == "offset":
        data[offset_at:offset_at + 8] = struct.pack("<Q", 1 << 40)
    elif case == "overlap":  # the embedding's offset moved onto the next tensor's data
        data[offset_at:offset_at + 8] = struct.pack("<Q", 32)
    elif case == "type":
        data[type_at:type_at + 4] = struct.pack("<I", 999)
    elif case == "dims":
        data[entry + name_len:entry + name_len + 4] = struct.pack("<I", 9)
    path = _write(tmp_path, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=message) as error:
        jaxpatch.load(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_unsupported_type_is_refused_by_name(tmp_path: Path) -> None:
    data = bytearray(TINY.read_bytes())
    entry = _first_tensor_entry(data)
    type_at = entry + 8 + len("token_embd.weight") + 4 + 16
    data[type_at:type_at + 4] = struct.pack("<I", 16)  # IQ2_XXS: 66 bytes per 256 values
    path = _write(tmp_path, bytes(data))
    with pytest.raises(UnsupportedConfigError, match="IQ2_XXS"):
        jaxpatch.load(path)


def test_other_architectures_are_refused_by_name(tmp_path: Path) -> None:
    data = TINY.read_bytes().replace(b"\x06\x00\x00\x00\x00\x00\x00\x00gemma3",
                                     b"\x06\x00\x00\x00\x00\x00\x00\x00llama3", 1)
    with pytest.raises(UnsupportedArchitectureError, match="'llama3' is not supported "
                                                           r"\(supported: gemma3, llama, qwen2, qwen3\)"):
        jaxpatch.load(_write(tmp_path, data))


def test_the_input_file_is_not_modified(tmp_path: Path) -> None:
    before = TINY.read_bytes()
    jaxpatch.load(TINY)
    assert TINY.read_bytes() == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_headers_give_only_jaxpatch_errors(tmp_path: Path, data: st.DataObject) -> None:
    original = TINY.read_bytes()
    end = _header_end(original)
    corrupted = bytearray(original[:end])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, end - 1))
        corrupted[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([len(corrupted), data.draw(st.integers(0, len(corrupted)))]))
    path = _write(tmp_path, bytes(corrupted[:cut]) + original[end:])
    try:
        read_gguf(path)
    except JaxpatchError as e:
        assert "\n" not in str(e)


# ------------------------------------------------------------------------- the real file

def _real_path() -> Path:
    from experiments.real_model import gemma3_270m_path

    try:
        return gemma3_270m_path()
    except JaxpatchError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def real_model() -> jaxpatch.Model:
    return jaxpatch.load(_real_path())


def test_real_file_logits_match_transformers(real_model: jaxpatch.Model) -> None:
    config = real_model.config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
            config.d_ff, config.vocab_size) == (18, 640, 4, 1, 256, 2048, 262144)
    assert config.sliding_windows.count(None) == 3
    with np.load(FIXTURES / "gemma3-270m.npz") as ref:
        ref = dict(ref)
    for row, length in enumerate(ref["prompt_lengths"]):
        logits = np.asarray(real_model([ref["prompt_ids"][row, :length].tolist()]))[0, -1]
        scale = np.abs(ref["top64_logits"][row]).max()
        assert np.abs(logits[ref["top64"][row]] - ref["top64_logits"][row]).max() < 1e-3 * scale
        assert np.abs(logits[ref["probe"]] - ref["probe_logits"][row]).max() < 1e-3 * scale
        assert np.argsort(-logits)[:5].tolist() == ref["top5"][row].tolist()


def test_real_model_generates_what_transformers_generates(real_model: jaxpatch.Model) -> None:
    from jaxpatch.engine.generation import greedy_generate
    from jaxpatch.prompts import Prompt, prompt_buffer

    ref = json.loads((FIXTURES / "gemma3-270m-generation.json").read_text())
    n_tokens = len(ref["continuations"][0])
    prompts = [Prompt(tuple(p)) for p in ref["prompts"]]
    tokens, lengths = prompt_buffer(real_model.config, prompts, n_tokens)  # one padded batch
    generated = np.asarray(greedy_generate(real_model.config, real_model.params, tokens, lengths,
                                           n_tokens))
    assert generated.tolist() == ref["continuations"]
    assert real_model.tokenizer.decode(generated[0].tolist()) == ref["texts"][0]


def test_real_tokenizer_matches_transformers(real_model: jaxpatch.Model) -> None:
    texts = _texts("gemma3-270m")
    ours = [real_model.tokenizer.encode(t).ids for t in texts["texts"]]
    assert ours == texts["ids"]
