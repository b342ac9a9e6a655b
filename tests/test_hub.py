"""Models by hub name, from a Hugging Face cache built here in the library's own layout (blobs,
snapshots, refs); the suite runs with HF_HUB_OFFLINE=1, so nothing touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from golden import FIXTURES, reference

import jaxpatch
from jaxpatch.errors import CheckpointNotFoundError, PickleCheckpointError
from jaxpatch.io.hub import hub_revision, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLDER = "fedcba9876543210fedcba9876543210fedcba98"


def add_snapshot(cache: Path, repo_id: str, source: Path, commit: str,
                 ref: str | None = "main") -> Path:
    """Puts `source`'s files in `cache` as huggingface_hub stores a download: content-addressed
    blobs, a snapshot folder of links to them named by the commit, and a ref naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache, made the one huggingface_hub uses (offline)."""
    from huggingface_hub import constants

    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def test_a_hub_name_loads_from_the_cache_with_transformers_numbers(cache: Path) -> None:
    snapshot = add_snapshot(cache, "acme/tiny-llama", FIXTURES / "llama-gqa", COMMIT)
    model = jaxpatch.load("acme/tiny-llama")
    assert Path(model.source) == snapshot
    assert hub_revision(model.source) == ("acme/tiny-llama", COMMIT)
    ref = reference("llama-gqa")
    mask = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(model(ref["tokens"], mask)) - ref["logits"])[mask].max() < 1e-4
    assert model.tokenizer is not None


def test_a_revision_picks_its_snapshot(cache: Path) -> None:
    add_snapshot(cache, "acme/tiny", FIXTURES / "llama-gqa", COMMIT)
    add_snapshot(cache, "acme/tiny", FIXTURES / "qwen2", OLDER, ref=None)
    assert jaxpatch.load("acme/tiny").config.family == "llama"
    assert jaxpatch.load(f"acme/tiny@{OLDER}").config.family == "qwen2"
    assert jaxpatch.load("acme/tiny", revision=OLDER).config.family == "qwen2"
    with pytest.raises(CheckpointNotFoundError, match="acme/tiny@v2: no such folder here, and not in"):
        jaxpatch.load("acme/tiny@v2")


def test_a_local_folder_wins_over_a_name(cache: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    add_snapshot(cache, "acme/model", FIXTURES / "llama-gqa", COMMIT)
    shutil.copytree(FIXTURES / "gpt2", tmp_path / "acme" / "model")
    monkeypatch.chdir(tmp_path)
    assert resolve("acme/model").repo_id is None
    assert jaxpatch.load("acme/model").config.family == "gpt2"


def test_a_name_missing_from_the_cache_fails_in_one_line_naming_what_to_do(cache: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as caught:
        jaxpatch.load("Qwen/Qwen3-0.6B")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("Qwen/Qwen3-0.6B: no such folder here, and not in the Hugging Face "
                              f"cache ({cache})")
    assert "`hf download Qwen/Qwen3-0.6B`" in message


def test_a_repository_without_safetensors_is_refused(cache: Path, tmp_path: Path) -> None:
    only_pickles = tmp_path / "pickled"
    only_pickles.mkdir()
    shutil.copy(FIXTURES / "llama-gqa" / "config.json", only_pickles)
    add_snapshot(cache, "acme/old", only_pickles, COMMIT)  # what the allowed files leave
    with pytest.raises(PickleCheckpointError, match="acme/old: the hub repository has no "
                                                    "safetensors weights at revision 0123456789ab"):
        jaxpatch.load("acme/old")


@pytest.mark.parametrize("name", ["../up", "a/b/c", "x--y/z", "model.gguf", "bad name"])
def test_what_cannot_be_a_hub_name_is_a_missing_path(cache: Path, name: str) -> None:
    with pytest.raises(CheckpointNotFoundError, match="checkpoint folder or GGUF file not found"):
        jaxpatch.load(name)


def test_the_cli_reads_the_cache_from_the_environment(cache: Path, tmp_path: Path,
                                                       donor_dir: Path) -> None:
    """In a fresh process: HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them; a run records
    the name as given and the snapshot's commit; a missing name exits 2 with one line."""
    add_snapshot(cache, "acme/base", FIXTURES / "llama-gqa", COMMIT)
    add_snapshot(cache, "acme/donor", donor_dir, OLDER)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "jaxpatch.cli"]
    info = subprocess.run([*cli, "info", "acme/base"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert info.returncode == 0, info.stderr
    assert f"hub: acme/base at commit {COMMIT}" in info.stdout
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    run = subprocess.run([*cli, "sweep", "--base", "acme/base", "--donor", "acme/donor", "--prompts",
                          str(prompts), "--select", "layers.0.mlp", "--out", str(tmp_path / "run"),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    recorded = json.loads((tmp_path / "run" / "scores.json").read_text())["inputs"]["base"]
    assert recorded["path"] == "acme/base" and recorded["revision"] == COMMIT
    missing = subprocess.run([*cli, "info", "acme/absent"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "acme/absent: no such folder here" in missing.stderr


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "acme/x: the model is gated: accept its license on huggingface.co/acme/x, "
                       "then log in"),
    ("RepositoryNotFoundError", "acme/x: no such folder here and no such model on the Hugging Face "
                                "hub"),
    ("RevisionNotFoundError", "acme/x: the hub repository has no revision"),
    ("LocalEntryNotFoundError", "acme/x: no such folder here, and not in the Hugging Face cache"),
])
def test_each_hub_failure_is_one_line_naming_the_model(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                       error: str, message: str) -> None:
    """What the hub answers online, simulated: each of huggingface_hub's errors becomes one line
    (the errors are made without their HTTP response, which only their message would use)."""
    import huggingface_hub
    from huggingface_hub import errors

    kind = getattr(errors, error)

    def refuse(*args: object, **kwargs: object) -> str:
        failure = kind.__new__(kind)
        Exception.__init__(failure, "the hub's own words")
        raise failure

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointNotFoundError) as caught:
        jaxpatch.load("acme/x")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
