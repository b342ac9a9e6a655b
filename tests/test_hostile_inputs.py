"""Untrusted inputs: generated malformed safetensors files, configs, selectors, YAML, prompt
files and progress logs give only jaxpatch's own errors, promptly, and write nothing; every
command leaves its input folders byte for byte as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from golden import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxpatch
from jaxpatch.cli import main
from jaxpatch.errors import JaxpatchError
from jaxpatch.io import safetensors
from jaxpatch.merge.config import read_config
from jaxpatch.models.families import config_from_hf
from jaxpatch.prompts import make_batch, read_prompts
from jaxpatch.runs.log import RunLog

FUZZ = settings(max_examples=60, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
CONFIG = json.loads((FIXTURES / "llama-gqa" / "config.json").read_text())
WEIGHTS = (FIXTURES / "llama-gqa" / "model.safetensors").read_bytes()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative name, with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_or_accepted(call: Callable[[], Any], folder: Path) -> None:
    """`call()` either succeeds or raises a `JaxpatchError`; `folder` is unchanged."""
    before = snapshot(folder)
    try:
        call()
    except JaxpatchError:
        pass
    assert snapshot(folder) == before


def checkpoint(tmp_path: Path, config: Any = None, weights: bytes | None = None) -> Path:
    folder = tmp_path / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    (folder / "model.safetensors").write_bytes(WEIGHTS if weights is None else weights)
    return folder


# ------------------------------------------------------------------------------ safetensors

def header_file(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8", "x", 3]),
    "shape": st.lists(st.integers(min_value=-3, max_value=2**62), max_size=4)
    | st.just("nope"),
    "data_offsets": st.lists(st.integers(min_value=-10, max_value=2**63), min_size=0, max_size=3),
})


@FUZZ
@given(tensors=st.dictionaries(st.sampled_from(["model.norm.weight", "lm_head.weight", "w", "v"]),
                               entries, max_size=3),
       data=st.binary(max_size=64), claimed=st.none() | st.integers(0, 2**64 - 1))
def test_generated_safetensors_headers_are_refused_cleanly(tmp_path: Path, tensors: dict,
                                                           data: bytes, claimed: int | None) -> None:
    raw = header_file(tensors, data)
    if claimed is not None:  # a header size that lies
        raw = struct.pack("<Q", claimed) + raw[8:]
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    refused_or_accepted(lambda: [safetensors.read_tensor(i)
                                 for i in safetensors.read_header(path).values()], tmp_path)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1,
                      max_size=6), cut=st.none() | st.integers(0, len(WEIGHTS)))
def test_corrupted_checkpoints_load_or_are_refused(tmp_path: Path, flips: list, cut: int | None) -> None:
    data = bytearray(WEIGHTS)
    for offset, value in flips:  # bytes of the header and the first tensors
        data[offset % len(data)] = value
    folder = checkpoint(tmp_path, weights=bytes(data[:cut]))
    refused_or_accepted(lambda: jaxpatch.load(folder), tmp_path)


@pytest.mark.parametrize("lie, message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, "needs 16 bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "'w' and 'v' overlap"),
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, "needs"),
    ({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "is truncated"),
])
def test_lying_headers_are_named(tmp_path: Path, lie: dict, message: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(header_file(lie, bytes(16)))
    with pytest.raises(JaxpatchError, match=message):
        safetensors.read_header(path)


def test_a_header_size_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(JaxpatchError, match="exceeds the file size"):
        safetensors.read_header(path)


# ---------------------------------------------------------------------------------- configs

@FUZZ
@given(key=st.sampled_from(sorted(CONFIG) + ["sliding_window", "head_dim", "rope_scaling",
                                              "layer_types", "architectures"]),
       value=json_values)
def test_configs_with_wrong_types_or_absurd_sizes_are_refused(tmp_path: Path, key: str,
                                                              value: Any) -> None:
    folder = checkpoint(tmp_path, {**CONFIG, key: value})
    refused_or_accepted(lambda: jaxpatch.load(folder), tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", 10**12, "num_hidden_layers=1000000000000 is out of range"),
    ("vocab_size", -1, "vocab_size=-1 is out of range"),
    ("hidden_size", "32", "hidden_size='32' is not an integer"),
    ("rms_norm_eps", "tiny", "rms_norm_eps='tiny' is not a positive number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings='yes' is not true or false"),
    ("num_key_value_heads", 3, "malformed config"),
])
def test_config_errors_name_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(JaxpatchError, match=message):
        config_from_hf({**CONFIG, key: value}, "config.json")


def test_an_absurd_layer_count_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """10^9 layers is refused at once: nothing is sized from the claim."""
    folder = checkpoint(tmp_path, {**CONFIG, "num_hidden_layers": 10**9})
    with pytest.raises(JaxpatchError, match="num_hidden_layers=1000000000 is out of range"):
        jaxpatch.load(folder)


def test_an_index_pointing_outside_the_folder_writes_and_reads_nothing(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../../etc/passwd"}}))
    with pytest.raises(JaxpatchError, match="points outside the checkpoint folder"):
        jaxpatch.load(folder)


# ------------------------------------------------------------------- selectors, YAML, prompts

@FUZZ
@given(text=st.text(max_size=40) | st.from_regex(
    r"(layers\.[0-9*,\-]{0,6}\.)?(mlp|self_attn)?(\.[a-z_]{0,8})?(\[[a-z]+=[0-9\-,*]{0,8}\])?",
    fullmatch=True),
       granularity=st.sampled_from(["module", "head", "neuron", "layer"]))
def test_selectors_parse_or_are_refused(text: str, granularity: str) -> None:
    config = jaxpatch.ModelConfig.tiny("llama")
    try:
        jaxpatch.select(config, text, granularity)
    except JaxpatchError:
        pass


@FUZZ
@given(text=st.text(max_size=200) | st.builds(
    lambda v: "merge_method: ties\nbase_model: b\nmodels:\n  - model: e\n    parameters: " + v,
    st.text(max_size=30)) | st.just("a: " + "[" * 5000 + "]" * 5000)
    | st.just("a: &a [1]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: [*c, *c]\n"))
def test_merge_yaml_parses_or_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "merge.yml"
    path.write_text(text)
    refused_or_accepted(lambda: read_config(path), tmp_path)


@FUZZ
@given(lines=st.lists(
    st.binary(max_size=30) | st.builds(lambda v: json.dumps({"tokens": v}).encode(), json_values)
    | st.builds(lambda v: json.dumps({"tokens": [1, 2], "target_tokens": v}).encode(), json_values),
    max_size=4))
def test_prompt_files_parse_or_are_refused(tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(lines))
    config = jaxpatch.ModelConfig.tiny("llama")

    def run() -> None:
        make_batch(config, read_prompts(path), "last")

    refused_or_accepted(run, tmp_path)


@pytest.mark.parametrize("content, message", [
    (b'{"tokens": [1]}\n\xff\xfe\n', ":2: not UTF-8 text"),
    (b'{"tokens": [1, 99999999999]}\n', ":1: 'tokens' must be a non-empty list of token ids"),
    (b'{"tokens": [1, -4]}\n', ":1: 'tokens' must be a non-empty list of token ids"),
    (b'{"tokens": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", ":1: the JSON nests too deeply"),
    (b'{"tokens": [1], "text": "' + b"x" * (5 * 1024**2) + b'"}\n', ":1: a line of"),
])
def test_prompt_file_errors_name_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(JaxpatchError, match=message):
        read_prompts(path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_damaged_progress_logs_are_refused_or_trimmed(tmp_path: Path, data: bytes) -> None:
    folder = tmp_path / "run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "progress.jsonl").write_bytes(data)
    try:
        RunLog.open(folder, {"a": 1}).close()
    except JaxpatchError:
        assert (folder / "progress.jsonl").read_bytes() == data  # refused: left as it was
    else:  # accepted: what is left is a log that opens again unchanged
        kept = (folder / "progress.jsonl").read_bytes()
        RunLog.open(folder, {"a": 1}).close()
        assert (folder / "progress.jsonl").read_bytes() == kept


# ----------------------------------------------------------------- inputs are never modified

def test_every_command_leaves_its_input_folders_byte_identical(tmp_path: Path,
                                                                 donor_dir: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "llama-gqa", base)
    donor = tmp_path / "donor"
    shutil.copytree(donor_dir, donor)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "the quick brown fox", "target": " jumps", "foil": " dog"}\n'
                       '{"tokens": [5, 6, 7, 8], "target_tokens": [11], "foil_tokens": [12]}\n')
    merge = tmp_path / "merge.yml"
    merge.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {donor}\n"
                     "    parameters: {weight: 1, density: 0.5}\n")
    inputs = {p: snapshot(p) for p in (base, donor)}
    prompts_bytes, merge_bytes = prompts.read_bytes(), merge.read_bytes()
    run = ["--base", str(base), "--donor", str(donor), "--prompts", str(prompts), "--no-progress"]
    commands = [
        ["info", str(base)], ["forward", str(base), "--text", "the quick"],
        ["sweep", *run, "--out", str(tmp_path / "sweep")],
        ["attribute", *run, "--granularity", "head", "--out", str(tmp_path / "attribute")],
        ["localize", *run, "--top-k", "4", "--controls", "2", "--out", str(tmp_path / "localize")],
        ["learn", *run, "--steps", "3", "--out", str(tmp_path / "learn")],
        ["trace", *run, "--select", "layers.1", "--depth", "1", "--out", str(tmp_path / "trace")],
        ["merge", str(merge), str(tmp_path / "merged")],
        ["convert", str(base), str(tmp_path / "converted"), "--dtype", "bfloat16"],
        ["sweep", *run, "--out", str(tmp_path / "sweep")],  # a resumed run reads its log
    ]
    for command in commands:
        assert main(command) == 0, command
        for folder, before in inputs.items():
            assert snapshot(folder) == before, (command, folder)
        assert prompts.read_bytes() == prompts_bytes and merge.read_bytes() == merge_bytes
    assert np.isfinite(json.loads((tmp_path / "sweep" / "scores.json").read_text())
                       ["components"][0]["score"])


@FUZZ
@given(alpha=st.dictionaries(st.text(max_size=6), st.fixed_dictionaries({
    "shape": json_values | st.lists(st.integers(-2, 2**40), max_size=3),
    "indices": json_values, "values": json_values}), max_size=2) | json_values)
def test_patch_files_parse_or_are_refused(alpha: Any) -> None:
    text = json.dumps({"format": "jaxpatch.patch/1", "alpha": alpha})
    try:
        jaxpatch.Patch.from_json(text)
    except JaxpatchError:
        pass
