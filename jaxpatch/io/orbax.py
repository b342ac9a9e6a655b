"""Orbax checkpoints written by jaxpatch: `jaxpatch.json` (the config) beside `params/`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from jaxpatch.errors import CheckpointNotFoundError, CorruptCheckpointError
from jaxpatch.models.config import ModelConfig, RopeScaling, param_shapes
from jaxpatch.models.model import Model
from jaxpatch.runs.atomic import atomic_directory

__all__ = ["MARKER", "FORMAT_VERSION", "is_orbax_checkpoint", "config_to_json", "config_from_json",
           "save_orbax", "load_orbax"]

MARKER = "jaxpatch.json"
FORMAT_VERSION = 1


def is_orbax_checkpoint(folder: Path) -> bool:
    """Whether `folder` is an Orbax checkpoint written by jaxpatch.

    Example:
        >>> is_orbax_checkpoint(Path("."))
        False
    """
    return (folder / MARKER).is_file()


def config_to_json(config: ModelConfig) -> dict:
    """A `ModelConfig` as plain JSON data (the inverse of `config_from_json`).

    Example:
        >>> config_to_json(ModelConfig.tiny("gpt2"))["family"]
        'gpt2'
    """
    return dataclasses.asdict(config)


def config_from_json(data: dict, source: str = MARKER) -> ModelConfig:
    """Rebuilds a `ModelConfig` from `config_to_json`'s output.

    Example:
        >>> cfg = ModelConfig.tiny("llama")
        >>> config_from_json(config_to_json(cfg)) == cfg
        True
    """
    try:
        fields = dict(data)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        fields["sliding_windows"] = tuple(fields.get("sliding_windows", ()))
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{source}: not a jaxpatch model config ({e})") from None


def save_orbax(model: Model, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Writes `model` as an Orbax checkpoint folder (atomically).

    Arguments:
        model: the model.
        path: the folder to create.
        overwrite: replace an existing folder.

    Example:
        >>> save_orbax(jaxpatch.load(fixtures / "gpt2"), tmp / "my-model-orbax")
        >>> sorted(f.name for f in (tmp / "my-model-orbax").iterdir())
        ['jaxpatch.json', 'params', 'tokenizer.json']
    """
    import orbax.checkpoint as ocp

    from jaxpatch.chat import write_chat_template

    with atomic_directory(path, overwrite=overwrite) as tmp:
        marker = {"format_version": FORMAT_VERSION, "config": config_to_json(model.config)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / "params").absolute(), model.params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        if model.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())
        if model.chat_template is not None:
            write_chat_template(model.chat_template, tmp)


def load_orbax(path: str | os.PathLike[str], dtype: str | None = None) -> Model:
    """Loads an Orbax checkpoint folder written by `save_orbax`.

    Arguments:
        path: the folder.
        dtype: cast floating params to this dtype (default: keep the stored dtype).

    Example:
        >>> save_orbax(jaxpatch.load(fixtures / "gpt2"), tmp / "my-model-orbax")
        >>> load_orbax(tmp / "my-model-orbax").config.family
        'gpt2'
    """
    import orbax.checkpoint as ocp

    from jaxpatch.chat import read_chat_template
    from jaxpatch.io.hf import load_tokenizer, read_json

    folder = Path(path)
    marker = read_json(folder / MARKER)
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{folder / MARKER}: unknown format version")
    config = config_from_json(marker.get("config", {}), str(folder / MARKER))
    if not (folder / "params").is_dir():
        raise CheckpointNotFoundError(f"{folder / 'params'}: Orbax params folder not found")
    target = param_shapes(config)
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore((folder / "params").absolute(), target)
    except Exception as e:  # orbax raises many types for unreadable folders
        raise CorruptCheckpointError(f"{folder / 'params'}: cannot be restored ({e})") from None
    finally:
        checkpointer.close()
    if dtype is not None:
        config = config.replace(dtype=dtype)
        params = jax.tree_util.tree_map(lambda x: x.astype(config.jnp_dtype), params)
    return Model(config, params, load_tokenizer(folder), str(folder), read_chat_template(folder))
