"""Outputs: written atomically, and an overwrite never deletes what jaxpatch did not write."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import FIXTURES

import jaxpatch
from jaxpatch.cli import main
from jaxpatch.errors import OutputExistsError
from jaxpatch.io.hf import save_hf
from jaxpatch.runs.atomic import atomic_directory


def test_an_overwritten_folder_keeps_what_jaxpatch_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "results.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "results.json").write_text("new")
    assert (out / "results.json").read_text() == "new" and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_an_overwritten_checkpoint_drops_stale_shards_and_keeps_notes(tmp_path: Path) -> None:
    model = jaxpatch.load(FIXTURES / "gpt2")
    out = tmp_path / "model"
    save_hf(model, out, max_shard_bytes=20_000)  # several shards
    assert len(list(out.glob("*.safetensors"))) > 1
    (out / "notes.txt").write_text("mine")
    jaxpatch.save(model, out, overwrite=True)  # one shard now
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "notes.txt", "tokenizer.json"]
    assert jaxpatch.load(out).config == model.config


def test_a_file_where_a_folder_goes_is_refused_even_with_overwrite(tmp_path: Path, capsys) -> None:
    file = tmp_path / "taken"
    file.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is a file, not a folder"):
            with atomic_directory(file, overwrite=overwrite):
                pass
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"tokens": [1, 2, 3]}\n')
    run = ["sweep", "--base", str(FIXTURES / "gpt2"), "--donor", str(FIXTURES / "gpt2"),
           "--prompts", str(prompts), "--no-progress", "--out", str(file)]
    for extra in ([], ["--overwrite"]):
        assert main([*run, *extra]) == 2
        assert "taken: is a file, not a folder; choose a folder for --out" in capsys.readouterr().err
    assert file.read_text() == "a file"


def test_a_demo_run_overwritten_keeps_a_users_notes(tmp_path: Path) -> None:
    from jaxpatch.studies.evaluate import default_pair_dir, evaluate, load_planted
    from jaxpatch.studies.report import write_run

    evaluation = evaluate(load_planted(default_pair_dir()), granularities=("module",),
                          stages=["exact-denoise"])
    out = tmp_path / "run"
    write_run(evaluation.summary, evaluation.results, out)
    (out / "notes.txt").write_text("mine")
    write_run(evaluation.summary, evaluation.results, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.html").is_file()


def test_another_commands_folder_is_named_as_such(tmp_path: Path, capsys) -> None:
    from jaxpatch.studies.evaluate import default_pair_dir

    folder = default_pair_dir()
    pair = ["--base", str(folder / "base"), "--donor", str(folder / "donor"), "--prompts",
            str(folder / "prompts" / "map.jsonl"), "--no-progress", "--out", str(tmp_path / "run")]
    assert main(["attribute", *pair]) == 0
    capsys.readouterr()
    assert main(["sweep", *pair]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("holds a `jaxpatch attribute` run, not a `jaxpatch sweep` one: choose "
                          "another --out, or pass --overwrite to start afresh there")


@pytest.mark.parametrize(("selector", "granularity", "message"), [
    ("layers.1.mpl", "module", "(did you mean 'mlp' for 'mpl'?)"),
    ("layers.0.self_atn", "module", "(did you mean 'self_attn' for 'self_atn'?)"),
    ("layers.1.mlp[neuron=0-511]", "neuron", "neuron 511 is out of range, layers.1.mlp has 128 "
                                             "(neuron=0-127)"),
    ("layers.1.self_attn[head=9]", "head", "head 9 is out of range, layers.1.self_attn has 4 "
                                           "(head=0-3)")])
def test_selector_mistakes_are_named_with_what_to_write(selector, granularity, message) -> None:
    from jaxpatch.errors import SelectorError

    config = jaxpatch.load(FIXTURES / "gpt2").config
    with pytest.raises(SelectorError) as caught:
        jaxpatch.select(config, selector, granularity)
    assert message in str(caught.value)


def test_yaml_mistakes_name_their_line_and_a_checkpoint_file_names_its_folder(tmp_path) -> None:
    from jaxpatch.errors import CheckpointNotFoundError, InvalidInputError
    from jaxpatch.merge.config import read_config

    bad = tmp_path / "merge.yml"
    bad.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1\n")
    with pytest.raises(InvalidInputError, match=r"merge.yml:\d+: not YAML \("):
        read_config(bad)
    with pytest.raises(CheckpointNotFoundError, match="is a file of a checkpoint; give its folder"):
        jaxpatch.load(FIXTURES / "gpt2" / "model.safetensors")


def test_a_prompt_of_mostly_unknown_tokens_is_warned_about(tmp_path, caplog) -> None:
    from jaxpatch.prompts import read_prompts

    tokenizer = jaxpatch.load(FIXTURES / "gpt2").tokenizer
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "the quick brown fox"}\n{"text": "ZZZ QQQ"}\n')
    with caplog.at_level("WARNING", logger="jaxpatch"):
        read_prompts(prompts, tokenizer)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "p.jsonl:2: " in warned[0] and "unknown to the tokenizer" in warned[0]


def test_a_heatmap_outlines_the_marked_components() -> None:
    import io

    import matplotlib.image
    import numpy as np

    from jaxpatch.figures import heatmap_png
    from jaxpatch.results import SweepResult

    names = [f"layers.{i}.mlp.{m}_proj" for i in range(2) for m in ("up", "down")]
    result = SweepResult(metric="m", direction="denoise", readout_layer=None, positions="last",
                         base_score=0.0, donor_score=1.0, names=names,
                         scores=np.array([0.0, 0.0, 0.0, 0.0]))  # an all-white grid

    def black_pixels(marked: list[str]) -> int:
        image = matplotlib.image.imread(io.BytesIO(heatmap_png(result, "t", marked=marked)))
        return int((image[..., :3].sum(-1) < 0.3).sum())

    plain = black_pixels([])
    assert black_pixels(["lm_head"]) == plain  # outside the grid: nothing drawn
    assert black_pixels(["layers.1.mlp.down_proj"]) > plain + 100  # an outline's worth of ink
