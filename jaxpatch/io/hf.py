"""Hugging Face checkpoint folders in and out, with no torch.

A folder holds `config.json`, the weights as `model.safetensors` or as shards listed in
`model.safetensors.index.json`, and optionally `tokenizer.json` and a chat template
(`chat_template.jinja` or `tokenizer_config.json`, `jaxpatch.chat`). Loading validates the config
and every tensor's name and shape against the architecture before reading any data, then
fills the params tree one tensor at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxpatch._tree import flatten_params
from jaxpatch.chat import read_chat_template, write_chat_template
from jaxpatch.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingTensorError,
    PickleCheckpointError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsafePathError,
)
from jaxpatch.io import safetensors
from jaxpatch.mesh import axis_size, param_spec, place_params
from jaxpatch.models.config import ModelConfig, Params, param_shapes
from jaxpatch.models.families import config_from_hf, config_to_hf, hf_prefix, is_ignored_tensor, tensor_rules
from jaxpatch.models.model import Model
from jaxpatch.runs.atomic import atomic_directory

__all__ = ["SINGLE_FILE", "INDEX_FILE", "PICKLE_FILES", "MAX_WHOLE_BYTES", "read_json",
           "read_config", "weight_files", "tensor_index", "load_hf", "load_tokenizer", "save_hf"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 * 1024**2  # config.json and the shard index are small
MAX_WHOLE_BYTES = 256 * 1024**2  # a tensor held whole on every device of a mesh
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def read_json(path: Path) -> Any:
    """Parses a JSON file, refusing a malformed one with its name.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = p.write_text('{"a": 1}')
        >>> read_json(p)
        {'a': 1}
    """
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CorruptCheckpointError(f"{path}: {path.stat().st_size} bytes is too large for "
                                         f"a JSON settings file (at most {MAX_JSON_BYTES})")
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: the JSON nests too deeply") from None


def read_config(folder: Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face checkpoint folder.

    Example:
        >>> read_config(fixtures / "gpt2").family
        'gpt2'
    """
    raw = read_json(folder / "config.json")
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{folder / 'config.json'}: not a JSON object")
    return config_from_hf(raw, str(folder / "config.json"))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, checked to lie inside it.

    Raises:
        PickleCheckpointError: only pickle-based weights are present.
        UnsafePathError: the sharded index names a file outside the folder.
        CheckpointNotFoundError: no weights at all, or a shard the index names is missing.

    Example:
        >>> [f.name for f in weight_files(fixtures / "gpt2")]
        ['model.safetensors']
    """
    index = folder / INDEX_FILE
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index}: has no weight_map")
        return [_shard_path(folder, index, name) for name in dict.fromkeys(weight_map.values())]
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
    if pickles:
        raise PickleCheckpointError(
            f"{folder / pickles[0]}: jaxpatch never unpickles weights; convert the checkpoint to "
            "safetensors first, e.g. in Python with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, "
            "safe_serialization=True)")
    raise CheckpointNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _shard_path(folder: Path, index: Path, name: object) -> Path:
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(f"{index}: weight_map names a file {name!r}")
    root = folder.resolve()
    resolved = (folder / name).resolve()
    if os.path.isabs(name) or ".." in Path(name).parts or not resolved.is_relative_to(root):
        raise UnsafePathError(
            f"{index}: shard file {name!r} points outside the checkpoint folder; refusing to read it")
    if not resolved.exists():
        raise CheckpointNotFoundError(f"{index}: shard file {name!r} is missing")
    return resolved


def tensor_index(config: ModelConfig, files: list[Path]) -> dict[str, safetensors.TensorInfo]:
    """Every tensor of a checkpoint, by the family's canonical Hugging Face name.

    A checkpoint saved from the base model class (no `model.`/`transformer.` prefix) is
    accepted: its names are given the prefix.

    Example:
        >>> folder = fixtures / "llama-gqa"
        >>> tensor_index(read_config(folder), weight_files(folder))["model.norm.weight"].shape
        (32,)
    """
    infos: dict[str, safetensors.TensorInfo] = {}
    expected = {rule.hf_name for rule in tensor_rules(config)}
    prefix = hf_prefix(config)
    for file in files:
        for name, info in safetensors.read_header(file).items():
            key = prefix + name if name not in expected and prefix + name in expected else name
            if key in infos:
                raise CorruptCheckpointError(f"{file}: tensor {name!r} appears in more than one file")
            infos[key] = info
    return infos


def load_hf(path: str | os.PathLike[str], dtype: str | None = None, mesh: Mesh | None = None,
            max_whole_bytes: int = MAX_WHOLE_BYTES) -> Model:
    """Loads a Hugging Face checkpoint folder.

    Arguments:
        path: the folder (`config.json`, `model.safetensors` or a sharded index, and
            optionally `tokenizer.json`).
        dtype: cast floating params to "float32", "bfloat16" or "float16" (default: keep the
            stored dtype).
        mesh: place the params on this mesh as `jaxpatch.mesh.param_spec` says. With a
            `model` axis, each device's shard is read straight from the file, so no tensor
            split along `model` is ever held whole in host or device memory; without one,
            every device gets the whole model.
        max_whole_bytes: with a `model` axis, refuse a tensor that would be held whole on
            every device and is larger than this (one whose axis does not divide).

    Returns:
        The `Model`.

    Raises:
        JaxpatchError: a subclass naming the file, tensor or setting at fault.

    Example:
        >>> model = load_hf(fixtures / "llama-gqa")
        >>> model.config.family, model.config.n_heads, model.config.n_kv_heads
        ('llama', 4, 2)
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: checkpoint folder not found")
    config = read_config(folder)
    infos = tensor_index(config, weight_files(folder))
    rules = tensor_rules(config)
    _check_tensors(config, rules, infos)
    stored = str(infos[rules[0].hf_name].dtype)
    config = config.replace(dtype=dtype or (stored if stored in ("float32", "bfloat16", "float16")
                                            else config.dtype))
    leaves: dict[str, jax.Array] = {}
    split = mesh is not None and axis_size(mesh, "model") > 1  # else read whole, then placed
    for rule in rules:
        info = infos[rule.hf_name]
        cast = (config.jnp_dtype if dtype is not None and jnp.issubdtype(info.dtype, jnp.floating)
                else info.dtype)
        if split and mesh is not None:
            views = rule.to_canonical(safetensors.map_tensor(info))
            for leaf, view in zip(rule.leaves, views):
                leaves[leaf] = _sharded_leaf(mesh, leaf, view, cast, info, max_whole_bytes)
            continue
        array = safetensors.read_tensor(info).astype(cast, copy=False)
        for leaf, value in zip(rule.leaves, rule.to_canonical(array)):
            # device_put, unlike jnp.asarray, may adopt the host buffer without a copy (CPU).
            leaves[leaf] = jax.device_put(np.ascontiguousarray(value))
        del array
    params = fill_params(config, leaves)
    if mesh is not None and not split:  # every device holds the whole model
        params = place_params(mesh, params)
    return Model(config, params, load_tokenizer(folder), str(folder), read_chat_template(folder))


def _sharded_leaf(mesh: Mesh, leaf: str, view: np.ndarray, dtype: Any,
                  info: safetensors.TensorInfo, max_whole_bytes: int) -> jax.Array:
    """One params leaf placed on the mesh, each device's shard read from the mapped file."""
    sharding = NamedSharding(mesh, param_spec(mesh, leaf, view.shape))
    nbytes = view.size * np.dtype(dtype).itemsize
    if sharding.is_fully_replicated and nbytes > max_whole_bytes:
        raise TensorShapeError(
            f"{info.file.name}: tensor {info.name!r} ({leaf}, shape {tuple(view.shape)}, "
            f"{nbytes} bytes) would be held whole on every device: it is larger than "
            f"max_whole_bytes={max_whole_bytes} and does not split along the mesh's model axis "
            f"of {mesh.shape.get('model', 1)}")

    def shard(index: Any) -> np.ndarray:
        return np.array(view[index], dtype=dtype)  # a copy of the slice only

    return jax.make_array_from_callback(tuple(view.shape), sharding, shard)


def _check_tensors(config: ModelConfig, rules: list, infos: dict[str, safetensors.TensorInfo]) -> None:
    for rule in rules:
        info = infos.get(rule.hf_name)
        if info is None:
            raise MissingTensorError(
                f"tensor {rule.hf_name!r} of shape {rule.hf_shape} is missing from the checkpoint")
        if info.shape != rule.hf_shape:
            raise TensorShapeError(
                f"{info.file.name}: tensor {rule.hf_name!r} has shape {info.shape}, "
                f"expected {rule.hf_shape} from config.json")
    used = {rule.hf_name for rule in rules}
    for name, info in infos.items():
        if name not in used and not is_ignored_tensor(config, name):
            raise UnexpectedTensorError(
                f"{info.file.name}: tensor {name!r} is not part of a {config.family} model with "
                "this config.json")


def fill_params(config: ModelConfig, leaves: dict[str, jax.Array]) -> Params:
    """Puts named leaves (dotted canonical names) into the params tree of `config`.

    Example:
        >>> cfg = ModelConfig.tiny("llama")
        >>> flat = flatten_params(jaxpatch.init_params(cfg, jax.random.key(0)))
        >>> fill_params(cfg, flat)["layers"][1]["mlp"]["up_proj"]["weight"].shape
        (32, 64)
    """
    shapes = param_shapes(config)
    names = list(flatten_params(shapes))
    treedef = jax.tree_util.tree_structure(shapes)
    return jax.tree_util.tree_unflatten(treedef, [leaves[name] for name in names])


def load_tokenizer(folder: Path) -> Any:
    """The `tokenizers.Tokenizer` in `folder/tokenizer.json`, or None when there is none.

    Example:
        >>> load_tokenizer(fixtures / "gpt2").encode("hello").ids
        [9, 32, 13, 16]
    """
    file = folder / "tokenizer.json"
    if not file.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise CorruptCheckpointError(f"{file}: cannot be read as a tokenizer ({e})") from None


def save_hf(model: Model, path: str | os.PathLike[str], max_shard_bytes: int = 2 * 1024**3,
            overwrite: bool = False) -> None:
    """Writes a Hugging Face checkpoint folder that transformers loads with the same logits.

    Arguments:
        model: the model.
        path: the folder to create (written atomically).
        max_shard_bytes: split the weights into shards of at most this size, with an index.
        overwrite: replace an existing folder.

    Example:
        >>> save_hf(jaxpatch.load(fixtures / "gpt2"), tmp / "my-model")
        >>> sorted(f.name for f in (tmp / "my-model").iterdir())
        ['config.json', 'model.safetensors', 'tokenizer.json']
    """
    config = model.config
    flat = {name: np.asarray(leaf) for name, leaf in flatten_params(model.params).items()}
    tensors = {rule.hf_name: rule.to_hf([flat[leaf] for leaf in rule.leaves])
               for rule in tensor_rules(config)}
    shards = _split_shards(tensors, max_shard_bytes)
    with atomic_directory(path, overwrite=overwrite, owned=_checkpoint_file) as tmp:
        hf_config = {**config_to_hf(config), "torch_dtype": str(next(iter(tensors.values())).dtype)}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            safetensors.write_file(tmp / SINGLE_FILE, shards[0], {"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                safetensors.write_file(tmp / name, shard, {"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(a.nbytes for a in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if model.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())
        if model.chat_template is not None:
            write_chat_template(model.chat_template, tmp)


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def _checkpoint_file(name: str) -> bool:
    """Whether a name in a checkpoint folder is one of a checkpoint's files (replaced, or
    dropped as a stale shard, when the folder is overwritten); anything else is kept."""
    return (name.endswith(".safetensors") or name == "model.safetensors.index.json"
            or name in ("config.json", "generation_config.json", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"))
