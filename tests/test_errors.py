"""Every kind of bad input is refused with its own error, naming what is at fault."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from golden import FIXTURES

import jaxpatch
from jaxpatch import errors
from jaxpatch.cli import main
from jaxpatch.io import safetensors as st_io
from jaxpatch.models.families import config_from_hf


def copy_fixture(tmp_path: Path, name: str = "llama-gqa") -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_tensors(folder: Path, change) -> None:
    file = folder / "model.safetensors"
    tensors = {n: st_io.read_tensor(i) for n, i in st_io.read_header(file).items()}
    change(tensors)
    st_io.write_file(file, tensors)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(errors.CheckpointNotFoundError, match="nope: checkpoint folder or GGUF file not found"):
        jaxpatch.load(tmp_path / "nope")


def test_missing_config(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(errors.CheckpointNotFoundError, match="config.json: file not found"):
        jaxpatch.load(folder)


def test_missing_weights(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(errors.CheckpointNotFoundError, match="no model.safetensors"):
        jaxpatch.load(folder)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    edit_config(folder, model_type="bert")
    with pytest.raises(errors.UnsupportedArchitectureError,
                       match=r"'bert' is not supported \(supported: gpt2, llama, qwen2, qwen3, "
                             r"mistral, phi3, gemma, gemma2, gemma3_text, olmo2\)"):
        jaxpatch.load(folder)


def test_unsupported_head_architecture(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    edit_config(folder, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(errors.UnsupportedArchitectureError, match="LlamaForSequenceClassification"):
        jaxpatch.load(folder)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'yarn'"),
    ({"quantization_config": {"bits": 4}}, "key 'quantization_config' is not understood"),
    ({"hidden_act": "mish"}, "hidden_act='mish' is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_numerics_changing_settings_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    folder = copy_fixture(tmp_path)
    edit_config(folder, **change)
    with pytest.raises(errors.UnsupportedConfigError, match=message):
        jaxpatch.load(folder)


def test_phi3_longrope_is_refused_by_name(tmp_path: Path) -> None:
    """Phi-3's 128k variants rescale their rotary frequencies by sequence length (longrope)."""
    folder = copy_fixture(tmp_path, "phi3")
    edit_config(folder, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
    with pytest.raises(errors.UnsupportedConfigError, match="rope type 'longrope' is not supported"):
        jaxpatch.load(folder)


def test_gpt2_inverse_layer_scaling_is_refused(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path, "gpt2")
    edit_config(folder, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(errors.UnsupportedConfigError, match="scale_attn_by_inverse_layer_idx=True"):
        jaxpatch.load(folder)


def test_harmless_metadata_is_accepted(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    edit_config(folder, _name_or_path="someone/model", use_cache=False, temperature=0.7,
                bos_token_id=1, attention_dropout=0.1)
    assert jaxpatch.load(folder).config.n_layers == 2


@pytest.mark.parametrize("key, value", [
    ("_model_name_or_path", "/home/someone/gemma"),  # private metadata, as transformers writes
    ("_commit_hash", "0123abcd"),
    ("unk_token_id", 3),  # any special token's id
    ("image_token_ids", [5, 6]),
    ("hidden_dropout", 0.1),  # inert at inference
    ("auto_map", {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}),
    ("cache_implementation", "hybrid"),  # a generation setting
    ("use_some_future_switch", False),  # a key a newer transformers adds, at "off"
    ("some_future_setting", None),
    ("some_future_list", []),
])
def test_keys_that_cannot_change_the_numerics_are_accepted(tmp_path: Path, key: str,
                                                           value: object) -> None:
    folder = copy_fixture(tmp_path)
    edit_config(folder, **{key: value})
    assert jaxpatch.load(folder).config == jaxpatch.load(FIXTURES / "llama-gqa").config


@pytest.mark.parametrize("key, value", [("use_some_future_switch", True),
                                        ("some_future_scale", 0.5),
                                        ("logit_scale", 1.0)])
def test_an_unknown_key_with_a_value_that_is_not_off_is_refused_by_name(tmp_path: Path, key: str,
                                                                         value: object) -> None:
    folder = copy_fixture(tmp_path)
    edit_config(folder, **{key: value})
    with pytest.raises(errors.UnsupportedConfigError,
                       match=f"key '{key}' is not understood by jaxpatch for model_type 'llama'"):
        jaxpatch.load(folder)


DEFAULT_CONFIGS = json.loads((FIXTURES / "default_configs.json").read_text())


@pytest.mark.parametrize("family", sorted(DEFAULT_CONFIGS))
@pytest.mark.parametrize("form", ["to_dict", "saved"])
def test_every_default_config_of_the_installed_transformers_is_read(family: str, form: str) -> None:
    """What transformers holds and writes for each supported family's default config, recorded
    by scripts/make_fixtures.py: every key is either read or harmless."""
    config = config_from_hf(DEFAULT_CONFIGS[family][form])
    assert config.family == family
    assert set(DEFAULT_CONFIGS) == set(jaxpatch.FAMILIES)


def test_truncated_safetensors(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(errors.CorruptCheckpointError, match="model.safetensors: tensor '.*' ends at byte .* truncated"):
        jaxpatch.load(folder)


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "too short"),
    ((10**12).to_bytes(8, "little") + b"{}", "header length 1000000000000 exceeds the file size"),
    ((8).to_bytes(8, "little") + b"not json", "not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
])
def test_corrupt_safetensors_header(tmp_path: Path, content: bytes, message: str) -> None:
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(errors.CorruptCheckpointError, match=message):
        jaxpatch.load(folder)


def test_inconsistent_tensor_extent(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 12)
    with pytest.raises(errors.CorruptCheckpointError, match="'w' of shape \\(2, 2\\) and dtype F32 needs 16 bytes"):
        st_io.read_header(file)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(errors.MissingTensorError,
                       match="'model.layers.1.mlp.up_proj.weight' of shape \\(64, 32\\) is missing"):
        jaxpatch.load(folder)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)

    def shrink(t: dict) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]

    rewrite_tensors(folder, shrink)
    with pytest.raises(errors.TensorShapeError,
                       match="'model.layers.0.self_attn.k_proj.weight' has shape \\(16, 32\\), expected \\(32, 32\\)"):
        jaxpatch.load(folder)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.extra.weight": t["model.norm.weight"]}))
    with pytest.raises(errors.UnexpectedTensorError, match="'model.layers.0.extra.weight'"):
        jaxpatch.load(folder)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(tmp_path: Path, shard: str) -> None:
    folder = copy_fixture(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {"model.norm.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.UnsafePathError, match="points outside the checkpoint folder"):
        jaxpatch.load(folder)


def test_pickle_only_checkpoint_is_refused_with_a_way_out(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(errors.PickleCheckpointError, match="never unpickles.*safe_serialization=True"):
        jaxpatch.load(folder)


def test_all_errors_share_one_base_class() -> None:
    kinds = [getattr(errors, n) for n in dir(errors) if n.endswith("Error") and n != "JaxpatchError"]
    assert len(kinds) >= 10
    assert all(issubclass(k, errors.JaxpatchError) for k in kinds)


# ------------------------------------------------------------------------------------- the CLI

def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxpatch: error: ")
    return err


def test_cli_turns_each_bad_input_into_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "not found" in cli_error(capsys, ["info", str(tmp_path / "missing")])
    folder = copy_fixture(tmp_path)
    edit_config(folder, model_type="bert")
    assert "bert" in cli_error(capsys, ["info", str(folder)])
    good = str(FIXTURES / "gpt2")
    assert "out of range" in cli_error(capsys, ["forward", good, "--tokens", "1,500"])
    assert "longer than the model's context" in cli_error(
        capsys, ["forward", good, "--tokens", ",".join(["1"] * 40)])
    assert "comma-separated integers" in cli_error(capsys, ["forward", good, "--tokens", "a,b"])
    assert "already exists" in cli_error(capsys, ["convert", good, str(folder)])


def test_cli_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "--debug", str(tmp_path / "missing")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_console_script_exits_with_status_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "jaxpatch.cli", "info", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"jaxpatch: error: {tmp_path / 'x'}: checkpoint folder or GGUF file not found"]


# ------------------------------------------------------------------------- the sweep command

def write_prompts(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    return str(path)


PROMPT_LINES = ('{"text": "the quick brown fox", "target": " jumps", "foil": " dog"}\n'
                '{"tokens": [5, 6, 7, 8, 9, 10], "target_tokens": [11], "foil_tokens": [12]}\n')


@pytest.mark.slow
def test_cli_sweep_writes_scores_and_heatmap(tmp_path: Path, donor_dir: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    prompts = write_prompts(tmp_path, PROMPT_LINES)
    out = tmp_path / "run"
    assert main(["sweep", "--base", str(FIXTURES / "llama-gqa"), "--donor", str(donor_dir),
                 "--prompts", prompts, "--granularity", "head", "--no-progress",
                 "--save-anchor", str(tmp_path / "anchor.npz"), "--out", str(out)]) == 0
    data = json.loads((out / "scores.json").read_text())
    assert data["metric"] == "anchor" and data["readout_layer"] == 1 and data["positions"] == "last"
    assert len(data["components"]) == 2 * (4 + 2)
    assert set(data["components"][0]) >= {"name", "score", "recovery"}
    assert set(data["timing"]) >= {"wall_s", "compile_s", "candidates_per_s"}
    assert len(data["inputs"]["base"]["sha256"]) == 64 and data["inputs"]["prompts"]["count"] == 2
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "scores.csv").read_text().count("\n") == 13
    # The values: every fourth head patched alone through the Python API, by the saved anchor.
    base, donor = jaxpatch.load(FIXTURES / "llama-gqa"), jaxpatch.load(donor_dir)
    batch = jaxpatch.make_batch(base.config, jaxpatch.read_prompts(prompts, base.tokenizer))
    anchor = jaxpatch.VectorAnchor(layer=1, path=str(tmp_path / "anchor.npz"))
    state = anchor.prepare(base.config, base.params, donor.params, batch)
    heads = jaxpatch.components(base.config, "head")
    for i in range(0, len(heads), 4):
        patch = jaxpatch.Patch.from_components(base.config, [heads[i]])
        assert data["components"][i]["name"] == heads[i].name
        assert data["components"][i]["score"] == pytest.approx(
            jaxpatch.score_patch(base, donor, patch, batch, anchor, state=state), abs=1e-5)
    out2 = tmp_path / "run2"
    assert main(["sweep", "--base", str(FIXTURES / "llama-gqa"), "--donor", str(donor_dir),
                 "--prompts", prompts, "--metric", "logit-diff", "--direction", "noise",
                 "--select", "layers.1.mlp", "--no-progress", "--out", str(out2)]) == 0
    second = json.loads((out2 / "scores.json").read_text())
    assert second["direction"] == "noise" and [c["name"] for c in second["components"]] == [
        "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    logit_diff = jaxpatch.LogitDiff()
    down = jaxpatch.Patch.from_selector(base.config, "layers.1.mlp.down_proj")
    assert second["components"][2]["score"] == pytest.approx(
        jaxpatch.score_patch(base, donor, down, batch, logit_diff, "noise"), abs=1e-5)
    nothing = jaxpatch.Patch.zeros(base.config)  # the unpatched donor
    assert second["donor_score"] == pytest.approx(
        jaxpatch.score_patch(base, donor, nothing, batch, logit_diff, "noise"), abs=1e-5)
    capsys.readouterr()


def test_cli_sweep_refuses_bad_input(tmp_path: Path, donor_dir: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    base = str(FIXTURES / "llama-gqa")
    good = write_prompts(tmp_path, PROMPT_LINES)
    run = ["sweep", "--base", base, "--donor", str(donor_dir), "--no-progress"]
    assert "none.jsonl: prompts file not found" in cli_error(
        capsys, [*run, "--prompts", str(tmp_path / "none.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 2]}\n{"tokens": [1, 2}\n')
    assert "bad.jsonl:2: not valid JSON" in cli_error(capsys, [*run, "--prompts", str(bad)])
    assert "anchor layer 5 is out of range" in cli_error(capsys, [*run, "--prompts", good,
                                                                  "--metric", "anchor",
                                                                  "--anchor-layer", "5"])
    # prompts with targets: logprob by default, which reads the targets' positions
    assert "--positions prompt does not apply to --metric logprob" in cli_error(
        capsys, [*run, "--prompts", good, "--positions", "prompt"])
    assert "--save-anchor applies to --metric anchor only, not --metric kl" in cli_error(
        capsys, [*run, "--prompts", good, "--metric", "kl", "--save-anchor", str(tmp_path / "a")])
    assert "matches no component" in cli_error(capsys, [*run, "--prompts", good, "--select", "layers.9"])
    gpt2 = ["sweep", "--base", str(FIXTURES / "gpt2"), "--donor", str(donor_dir), "--prompts", good]
    assert "base and donor differ: tensor" in cli_error(capsys, gpt2)
    assert "selector 'layers.[': expected a name" in cli_error(
        capsys, [*run, "--prompts", good, "--select", "layers.["])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert "already exists" in cli_error(capsys, [*run, "--prompts", good, "--out", str(tmp_path / "taken")])
