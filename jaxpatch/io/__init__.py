"""Checkpoints in and out: Hugging Face folders (safetensors, no torch), Orbax, and GGUF files
(in only)."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from jax.sharding import Mesh

from jaxpatch.errors import CheckpointNotFoundError
from jaxpatch.io.gguf_model import is_gguf, load_gguf
from jaxpatch.io.hf import load_hf, save_hf
from jaxpatch.io.hub import resolve
from jaxpatch.io.orbax import is_orbax_checkpoint, load_orbax, save_orbax
from jaxpatch.mesh import MeshLike, make_mesh, place_params
from jaxpatch.models.model import Model


def load(path: str | os.PathLike[str], dtype: str | None = None,
         mesh: MeshLike | None = None, revision: str | None = None) -> Model:
    """Loads a model from a Hugging Face checkpoint folder, a jaxpatch Orbax folder, a GGUF
    file, or by its Hugging Face hub name.

    Arguments:
        path: the checkpoint folder, a `.gguf` file (dequantized; needs the `gguf` extra for
            quantized tensors), or a hub name such as `Qwen/Qwen3-0.6B` (`NAME@REVISION` for a
            branch, tag or commit): read from the Hugging Face cache, fetched into it when
            missing (`jaxpatch.io.hub`; `HF_HUB_OFFLINE=1` keeps it local). A local path wins
            over a name.
        dtype: cast floating params to "float32", "bfloat16" or "float16" (default: as stored;
            float32 for GGUF).
        mesh: place the params on a mesh, split along its `model` axis (`jaxpatch.mesh`): a
            Hugging Face folder is read shard by shard (no split tensor is ever whole in
            memory); Orbax and GGUF are read whole, then placed.
        revision: the hub revision of a name (default `main`).

    Returns:
        A `Model` with `.config`, `.params`, `.tokenizer` (or None) and `__call__(tokens)`.

    Raises:
        JaxpatchError: a subclass naming the file, tensor or setting at fault.

    Example:
        >>> model = jaxpatch.load(fixtures / "llama-gqa")
        >>> model([[1, 2, 3]]).shape
        (1, 3, 96)
    """
    placed = make_mesh(mesh)  # a bad mesh is refused before any reading
    folder = resolve(path, revision).path
    if is_gguf(folder):
        return _placed(load_gguf(folder, dtype), placed)
    if folder.is_file():
        raise CheckpointNotFoundError(f"{folder}: is a file of a checkpoint; give its folder "
                                      f"({folder.parent})")
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: checkpoint folder or GGUF file not found")
    if is_orbax_checkpoint(folder):
        return _placed(load_orbax(folder, dtype), placed)
    return load_hf(folder, dtype, placed)


def _placed(model: Model, mesh: Mesh | None) -> Model:
    """A model read whole, placed on a mesh (unchanged without one)."""
    if mesh is None:
        return model
    return dataclasses.replace(model, params=place_params(mesh, model.params))


def save(model: Model, path: str | os.PathLike[str], format: Literal["hf", "orbax"] = "hf",
         overwrite: bool = False) -> None:
    """Writes a model as a Hugging Face folder (default) or an Orbax checkpoint, atomically.

    Arguments:
        model: the model.
        path: the folder to create; an existing non-empty folder is refused unless `overwrite`.
        format: "hf" (config.json + safetensors + tokenizer.json) or "orbax".
        overwrite: replace an existing folder.

    Example:
        >>> model = jaxpatch.load(fixtures / "llama-gqa")
        >>> jaxpatch.save(model, tmp / "copy", format="orbax")
        >>> jaxpatch.load(tmp / "copy").config == model.config
        True
    """
    if format == "hf":
        save_hf(model, path, overwrite=overwrite)
    elif format == "orbax":
        save_orbax(model, path, overwrite=overwrite)
    else:
        raise ValueError(f"format must be 'hf' or 'orbax', got {format!r}")


__all__ = ["load", "save", "load_hf", "save_hf", "load_orbax", "save_orbax", "load_gguf"]
