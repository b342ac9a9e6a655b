"""Checkpoints in and out: round trips, the safetensors format, sharding, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from golden import FIXTURES, FLOAT32_FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxpatch
from jaxpatch.io import safetensors as st_io
from jaxpatch.io.hf import INDEX_FILE, save_hf


def leaves_equal(a: dict, b: dict) -> None:
    fa, fb = jaxpatch.flatten_params(a), jaxpatch.flatten_params(b)
    assert list(fa) == list(fb)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({name: st_io.read_tensor(info) for name, info in st_io.read_header(file).items()})
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", FLOAT32_FIXTURES)
def test_hf_round_trip_gives_identical_params_and_tensors(name: str, tmp_path: Path) -> None:
    before = digest(FIXTURES / name)
    model = jaxpatch.load(FIXTURES / name)
    jaxpatch.save(model, tmp_path / "copy")
    again = jaxpatch.load(tmp_path / "copy")
    assert again.config == model.config
    leaves_equal(model.params, again.params)
    # Every tensor transformers wrote comes back bit-identical (tied heads aside).
    original, written = tensors_of(FIXTURES / name), tensors_of(tmp_path / "copy")
    for key, value in written.items():
        assert value.dtype == original[key].dtype
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    assert set(original) - set(written) <= {"lm_head.weight"}
    assert again.tokenizer.encode("the lazy fox").ids == model.tokenizer.encode("the lazy fox").ids
    assert digest(FIXTURES / name) == before, "the input checkpoint was modified"


@pytest.mark.parametrize("family", jaxpatch.FAMILIES)
def test_models_built_in_memory_round_trip(family: str, tmp_path: Path) -> None:
    config = jaxpatch.ModelConfig.tiny(family)
    model = jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(0)))
    jaxpatch.save(model, tmp_path / "hf")
    again = jaxpatch.load(tmp_path / "hf")
    assert again.config == model.config
    leaves_equal(model.params, again.params)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "llama-bf16"])
def test_orbax_round_trip_gives_identical_params(name: str, tmp_path: Path) -> None:
    model = jaxpatch.load(FIXTURES / name)
    jaxpatch.save(model, tmp_path / "orbax", format="orbax")
    again = jaxpatch.load(tmp_path / "orbax")
    assert again.config == model.config
    leaves_equal(model.params, again.params)
    assert again.tokenizer is not None


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path: Path) -> None:
    model = jaxpatch.load(FIXTURES / "mistral")
    save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    leaves_equal(model.params, jaxpatch.load(tmp_path / "sharded").params)


def test_load_casts_dtype() -> None:
    model = jaxpatch.load(FIXTURES / "llama-gqa", dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree_util.tree_leaves(model.params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_checkpoint_without_prefix_loads(tmp_path: Path) -> None:
    """Checkpoints saved from the base model class (GPT2Model, LlamaModel) lack the prefix."""
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "config.json").write_text((FIXTURES / "gpt2" / "config.json").read_text())
    tensors = {k.removeprefix("transformer."): v for k, v in tensors_of(FIXTURES / "gpt2").items()}
    st_io.write_file(folder / "model.safetensors", tensors)
    leaves_equal(jaxpatch.load(FIXTURES / "gpt2").params, jaxpatch.load(folder).params)


def test_save_refuses_existing_output_and_leaves_it_alone(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    model = jaxpatch.load(FIXTURES / "gpt2")
    with pytest.raises(jaxpatch.OutputExistsError, match="taken: already exists"):
        jaxpatch.save(model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    jaxpatch.save(model, target, overwrite=True)  # never deletes what jaxpatch did not write
    assert (target / "keep.txt").read_text() == "mine" and (target / "model.safetensors").exists()


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = jaxpatch.load(FIXTURES / "gpt2")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(st_io, "write_file", fail)
    with pytest.raises(OSError, match="disk full"):
        jaxpatch.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------- the safetensors format, against the library

DTYPES = [np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8]


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(
    st.text("abcdefghij._", min_size=1, max_size=12),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)),
    min_size=1, max_size=5))
def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path_factory: pytest.TempPathFactory,
                                                              spec: dict) -> None:
    rng = np.random.default_rng(0)
    tensors = {name: np.asarray(rng.standard_normal(shape) * 50).astype(dtype) for name, (dtype, shape) in spec.items()}
    folder = tmp_path_factory.mktemp("st")
    safetensors.numpy.save_file(tensors, str(folder / "lib.safetensors"))
    st_io.write_file(folder / "ours.safetensors", tensors)
    ours = {n: st_io.read_tensor(i) for n, i in st_io.read_header(folder / "lib.safetensors").items()}
    theirs = safetensors.numpy.load_file(str(folder / "ours.safetensors"))
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours[name], value)
        np.testing.assert_array_equal(theirs[name], value)
        assert ours[name].dtype == theirs[name].dtype == value.dtype


def test_bfloat16_tensors_round_trip(tmp_path: Path) -> None:
    value = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    st_io.write_file(tmp_path / "x.safetensors", {"w": value})
    back = st_io.read_tensor(st_io.read_header(tmp_path / "x.safetensors")["w"])
    assert back.dtype == value.dtype
    np.testing.assert_array_equal(back.astype(np.float32), value.astype(np.float32))
