"""Models by their Hugging Face hub name, through the local cache the ecosystem shares.

`resolve("Qwen/Qwen3-0.6B")` gives the folder of that model in the Hugging Face cache, fetched
with `huggingface_hub.snapshot_download` when it is not there yet: only the files jaxpatch reads
(`HUB_FILES`: configs, tokenizer files, chat templates and safetensors weights; never pickles).
The cache is where transformers and the `hf` command put models (`HF_HOME`, `HF_HUB_CACHE`), and
`HF_HUB_OFFLINE=1` keeps everything local, as it does for them. A local path always wins over a
name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from jaxpatch.errors import CheckpointNotFoundError, PickleCheckpointError

__all__ = ["HUB_FILES", "Resolved", "resolve", "hub_revision", "split_revision"]

HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
             "*.safetensors", "model.safetensors.index.json")
# A hub repository id: an optional owner and a name, letters, digits, `-`, `_`, `.` (hub rules).
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})$")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a model named by path or hub name lies.

    Attributes:
        path: the local folder or file.
        repo_id: the hub name it was resolved from (None for a local path).
        revision: the commit hash of the cached snapshot (None for a local path).
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None


def split_revision(name: str) -> tuple[str, str | None]:
    """A hub name with an optional `@revision` (branch, tag or commit) split in two.

    Example:
        >>> split_revision("Qwen/Qwen3-0.6B@main")
        ('Qwen/Qwen3-0.6B', 'main')
        >>> split_revision("google/gemma-3-270m")
        ('google/gemma-3-270m', None)
    """
    repo, at, revision = name.partition("@")
    return (repo, revision) if at and revision else (name, None)


def resolve(name: str | os.PathLike[str], revision: str | None = None) -> Resolved:
    """The local folder (or GGUF file) of a model given by path or by hub name.

    Arguments:
        name: a local folder or file (used as is when it exists), or a hub name such as
            `Qwen/Qwen3-0.6B`, optionally `NAME@REVISION`.
        revision: a branch, tag or commit hash of the hub repository (default: `main`, or the
            one after `@`).

    Returns:
        A `Resolved`: the path, and for a hub name the repository and the snapshot's commit.

    Raises:
        CheckpointNotFoundError: no such path, and no such model on the hub or in the cache (the
            message says which, and what to do: log in for a gated model, download it where
            there is a network).
        PickleCheckpointError: the repository holds no safetensors weights.

    Example:
        >>> resolve(fixtures / "gpt2").repo_id is None
        True
    """
    path = Path(name)
    if path.exists():
        return Resolved(path)
    text = os.fspath(name)
    repo_id, at_revision = split_revision(text)
    revision = revision or at_revision
    if (not _REPO_ID.fullmatch(repo_id) or repo_id.endswith(".gguf") or ".." in repo_id
            or "--" in repo_id):
        raise CheckpointNotFoundError(f"{text}: checkpoint folder or GGUF file not found")
    folder = Path(_download(repo_id, revision))
    commit = folder.name
    if not any(folder.glob("*.safetensors")):
        raise PickleCheckpointError(
            f"{repo_id}: the hub repository has no safetensors weights at revision {commit[:12]}; "
            "jaxpatch never unpickles weights: convert them with transformers "
            "(AutoModelForCausalLM.from_pretrained(NAME).save_pretrained(DIR)) and give DIR")
    return Resolved(folder, repo_id, commit)


def _download(repo_id: str, revision: str | None) -> str:
    """`snapshot_download` of jaxpatch's files, its errors turned into one line each."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = repo_id + (f"@{revision}" if revision else "")
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES))
    except GatedRepoError:
        raise CheckpointNotFoundError(
            f"{shown}: the model is gated: accept its license on huggingface.co/{repo_id}, then "
            "log in (`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"{shown}: no such folder here and no such model on the Hugging Face hub (a private "
            "model needs `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(
            f"{shown}: the hub repository has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointNotFoundError(
            f"{shown}: no such folder here, and not in the Hugging Face cache ({_cache_dir()}) "
            f"while {why}: download it where there is a network (`hf download {repo_id}`) "
            "into that cache, or give a checkpoint folder") from None
    except HfHubHTTPError as e:
        raise CheckpointNotFoundError(f"{shown}: the hub answered {str(e).splitlines()[0][:200]}") \
            from None
    except OSError as e:
        raise CheckpointNotFoundError(f"{shown}: cannot write to the Hugging Face cache "
                                      f"({_cache_dir()}): {e.strerror or e}") from None


def _cache_dir() -> str:
    """The hub cache folder huggingface_hub uses."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_revision(source: str | os.PathLike[str] | None) -> tuple[str, str] | None:
    """The hub repository and commit of a folder in the Hugging Face cache (a snapshot), else
    None.

    Example:
        >>> hub_revision("/cache/hub/models--Qwen--Qwen3-0.6B/snapshots/" + "a" * 40)
        ('Qwen/Qwen3-0.6B', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')
        >>> hub_revision("checkpoints/my-model") is None
        True
    """
    if source is None:
        return None
    match = _SNAPSHOT.search(os.fspath(source).rstrip("/\\"))
    if match is None:
        return None
    return match["repo"].replace("--", "/"), match["commit"]
