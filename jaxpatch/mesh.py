"""Device meshes: where jaxpatch's work is split across devices, in one documented place.

A mesh has named axes; jaxpatch maps its logical axes onto them here and nowhere else:

    candidates   the candidates of a chunk (the leading axis of a sweep's coefficients): each
                 device scores its share of the chunk. Attribution has no candidates: its
                 prompts split over this axis too.
    model        the params, tensor-parallel: attention heads (q, k, v, o), MLP neurons (gate,
                 up, down), the hidden axis of the embeddings and the vocabulary of lm_head
                 (`PARAM_AXES`). XLA's partitioner inserts the reductions.
    data         the prompts (the leading axis of a batch and of the cached residual streams).

A leaf whose axis does not divide by the mesh axis stays whole on every device (e.g. 2 key/value
heads on `model=4`); so do prompts that do not divide. Without a mesh nothing changes. Results
on any mesh equal one device's to float32 rounding (the same programs, partitioned by XLA).
`default_mesh` is what commands use when none is given: every device on `candidates`.

Several processes (hosts) join one run with `initialize_distributed` (`jaxpatch --distributed`):
every process sees every device and runs the same program, loads only its own devices' shards,
receives the gathered results (`to_host`), and the first one writes (`is_writer`); what every
process must decide alike (chunk sizes, recorded progress) the first decides (`broadcast_json`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpatch._tree import flatten_params
from jaxpatch.errors import InvalidInputError

__all__ = ["MeshLike", "MESH_AXES", "PARAM_AXES", "make_mesh", "parse_mesh", "default_mesh",
           "axis_size", "candidate_devices", "shard_candidates", "replicate", "candidate_specs", "param_spec",
           "param_shardings", "place_params", "place_leaves", "place_prompts", "prompt_spec", "to_host",
           "initialize_distributed", "is_writer", "broadcast_json"]

MeshLike = Union[Mesh, Mapping[str, int], str]
"""A `jax.sharding.Mesh`, axis sizes by name (`{"candidates": 4}`), or `"candidates=4"`."""

MESH_AXES: dict[str, str] = {
    "candidates": "the candidates of a chunk (attribution: its prompts)",
    "model": "attention heads, MLP neurons, the embeddings' hidden axis, lm_head's vocabulary",
    "data": "the prompts",
}
"""The mesh axes jaxpatch uses, with what each splits."""

PARAM_AXES: dict[str, int] = {
    "self_attn.q_proj.weight": 1, "self_attn.q_proj.bias": 0,   # [d_model, heads, head_dim]
    "self_attn.k_proj.weight": 1, "self_attn.k_proj.bias": 0,
    "self_attn.v_proj.weight": 1, "self_attn.v_proj.bias": 0,
    "self_attn.o_proj.weight": 0,                               # [heads, head_dim, d_model]
    "mlp.gate_proj.weight": 1, "mlp.gate_proj.bias": 0,         # [d_model, d_ff]
    "mlp.up_proj.weight": 1, "mlp.up_proj.bias": 0,
    "mlp.down_proj.weight": 0,                                  # [d_ff, d_model]
    "embed_tokens.weight": 1,                                   # [vocab, d_model]
    "embed_positions.weight": 1,
    "lm_head.weight": 1,                                        # [d_model, vocab]
}
"""Which axis of a params leaf the `model` axis splits (names without `layers.N.`); leaves not
named here (norms, output biases) are whole on every device."""

_LAYER = re.compile(r"^layers\.\d+\.")


def parse_mesh(text: str) -> dict[str, int]:
    """Axis sizes from `NAME=SIZE,NAME=SIZE` (the command line's `--mesh`).

    Example:
        >>> parse_mesh("candidates=4")
        {'candidates': 4}
    """
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, size = part.strip().partition("=")
        if not name or not size.strip().isdigit() or int(size) < 1:
            raise InvalidInputError(f"mesh {text!r}: expected NAME=SIZE[,NAME=SIZE], e.g. "
                                    "candidates=4")
        sizes[name.strip()] = int(size)
    return sizes


def make_mesh(spec: MeshLike | None) -> Mesh | None:
    """The mesh a spec names, on this process's devices (None stays None).

    Arguments:
        spec: a `Mesh` (used as is), axis sizes by name, or a `NAME=SIZE,...` string.

    Returns:
        The mesh, or None.

    Raises:
        InvalidInputError: an axis jaxpatch does not use, or sizes whose product is not the
            number of devices.

    Example:
        >>> dict(make_mesh({"candidates": 1}).shape)
        {'candidates': 1}
    """
    if spec is None:
        return None
    if isinstance(spec, Mesh):
        mesh = spec
    else:
        sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
        unknown = sorted(set(sizes) - set(MESH_AXES))
        if unknown:
            raise InvalidInputError(f"mesh axis {unknown[0]!r} is not one jaxpatch splits work "
                                    f"along (axes: {', '.join(MESH_AXES)})")
        count = 1
        for size in sizes.values():
            count *= size
        devices = jax.devices()
        if count > len(devices) or count < 1:
            raise InvalidInputError(f"mesh {sizes} needs {count} devices; this process has "
                                    f"{len(devices)}")
        mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices[:count],
                             axis_types=(AxisType.Auto,) * len(sizes))
    unknown = sorted(set(mesh.axis_names) - set(MESH_AXES))
    if unknown:
        raise InvalidInputError(f"mesh axis {unknown[0]!r} is not one jaxpatch splits work along "
                                f"(axes: {', '.join(MESH_AXES)})")
    return mesh


def default_mesh() -> Mesh | None:
    """Every device (of every process) on the `candidates` axis; None with one device.

    Example:
        >>> dict(default_mesh().shape) if default_mesh() else None  # two fake CPU devices in tests
        {'candidates': 2}
    """
    count = jax.device_count()
    return None if count == 1 else make_mesh({"candidates": count})


def candidate_devices(mesh: Mesh | None) -> int:
    """How many devices share a chunk's candidates (1 without a mesh).

    Example:
        >>> candidate_devices(None), candidate_devices(make_mesh({"candidates": 1}))
        (1, 1)
    """
    return axis_size(mesh, "candidates")


def _candidate_spec(mesh: Mesh) -> PartitionSpec:
    """The leading (candidate) axis over `candidates`; whole without that axis."""
    return PartitionSpec("candidates") if "candidates" in mesh.shape else PartitionSpec()


def shard_candidates(mesh: Mesh, tree: Any) -> Any:
    """Places every array of `tree` split along its leading (candidate) axis.

    Example:
        >>> x = shard_candidates(make_mesh({"candidates": 1}), {"a": jnp.ones((2, 3))})
        >>> x["a"].sharding.spec
        P('candidates',)
    """
    return jax.device_put(tree, NamedSharding(mesh, _candidate_spec(mesh)))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Places every array of `tree` whole on every device of the mesh.

    Example:
        >>> replicate(make_mesh({"candidates": 1}), jnp.ones(2)).sharding.spec
        P()
    """
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def candidate_specs(mesh: Mesh, specs: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    """Coefficient shapes with the candidates' sharding (for compiling before running).

    Example:
        >>> spec = candidate_specs(make_mesh({"candidates": 1}),
        ...                        {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
        >>> spec["w"].sharding.spec
        P('candidates',)
    """
    sharding = NamedSharding(mesh, _candidate_spec(mesh))
    return {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for name, s in specs.items()}


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """How many devices a mesh axis has (1 without a mesh or without that axis).

    Example:
        >>> axis_size(make_mesh({"candidates": 1}), "model"), axis_size(None, "data")
        (1, 1)
    """
    return 1 if mesh is None else int(mesh.shape.get(axis, 1))


def param_spec(mesh: Mesh, name: str, shape: tuple[int, ...], stacked: bool = False
               ) -> PartitionSpec:
    """The partition of one params leaf: its `PARAM_AXES` axis over `model` when that divides,
    else whole.

    Arguments:
        mesh: the mesh.
        name: the dotted leaf name (`layers.3.mlp.up_proj.weight` or `mlp.up_proj.weight`).
        shape: the leaf's shape.
        stacked: the leaf has a leading layer axis (`stack_layers`).

    Returns:
        A `PartitionSpec`.

    Example:
        >>> mesh = make_mesh({"model": 1})
        >>> param_spec(mesh, "layers.0.mlp.down_proj.weight", (64, 32))
        P('model',)
        >>> param_spec(mesh, "norm.weight", (32,))
        P()
    """
    axis = PARAM_AXES.get(_LAYER.sub("", name))
    size = axis_size(mesh, "model")
    if axis is None or "model" not in mesh.shape:
        return PartitionSpec()
    axis += int(stacked)
    if shape[axis] % size:
        return PartitionSpec()
    return PartitionSpec(*([None] * axis), "model")


def param_shardings(mesh: Mesh, params: Any, stacked: bool = False, prefix: str = "") -> Any:
    """A `NamedSharding` per params leaf (a pytree of the params' structure).

    Arguments:
        mesh: the mesh.
        params: a params tree (or a subtree: name it with `prefix`, e.g. `layers.0.`); leaves
            may be arrays or `jax.ShapeDtypeStruct`s.
        stacked: the blocks are stacked (`stack_layers`): every leaf has a layer axis first.
        prefix: the dotted name of the subtree.

    Returns:
        The shardings.

    Example:
        >>> shardings = param_shardings(make_mesh({"model": 1}), base.params)
        >>> shardings["layers"][0]["self_attn"]["q_proj"]["weight"].spec
        P(None, 'model')
    """
    names = list(flatten_params(params))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [
        NamedSharding(mesh, param_spec(mesh, prefix + n, tuple(x.shape), stacked))
        for n, x in zip(names, leaves)])


def place_params(mesh: Mesh, params: Any, stacked: bool = False, prefix: str = "") -> Any:
    """A params tree placed on the mesh as `param_shardings` says (a leaf already placed so
    is not copied).

    Example:
        >>> placed = place_params(make_mesh({"model": 1}), base.params)
        >>> placed["lm_head"]["weight"].sharding.spec if "lm_head" in placed else "tied"
        P(None, 'model')
    """
    return jax.device_put(params, param_shardings(mesh, params, stacked, prefix))


def place_leaves(mesh: Mesh, leaves: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Named params leaves (dotted names after `prefix`) placed as `param_spec` says.

    Example:
        >>> w = place_leaves(make_mesh({"model": 1}), {"mlp.up_proj.weight": jnp.ones((2, 4))},
        ...                  "layers.0.")
        >>> w["mlp.up_proj.weight"].sharding.spec
        P(None, 'model')
    """
    return {n: jax.device_put(x, NamedSharding(mesh, param_spec(mesh, prefix + n, x.shape)))
            for n, x in leaves.items()}


def prompt_spec(mesh: Mesh, prompts: int, axes: tuple[str, ...] = ("data",)) -> PartitionSpec:
    """How an array with `prompts` leading rows splits: over those of `axes` the mesh has,
    when their product divides the rows; else whole.

    Example:
        >>> prompt_spec(make_mesh({"data": 1}), 8)
        P('data',)
        >>> prompt_spec(make_mesh({"candidates": 1}), 8)
        P()
    """
    used = [a for a in axes if a in mesh.shape]
    size = int(np.prod([mesh.shape[a] for a in used])) if used else 1
    if not used or prompts % size:
        return PartitionSpec()
    return PartitionSpec(tuple(used) if len(used) > 1 else used[0])


def place_prompts(mesh: Mesh, tree: Any, prompts: int, axes: tuple[str, ...] = ("data",)
                  ) -> Any:
    """Every array of `tree` with `prompts` leading rows split as `prompt_spec` says; other
    arrays whole on every device.

    Example:
        >>> batch = place_prompts(make_mesh({"data": 1}), {"tokens": jnp.zeros((4, 3))}, 4)
        >>> batch["tokens"].sharding.spec
        P('data',)
    """
    split = NamedSharding(mesh, prompt_spec(mesh, prompts, axes))
    whole = NamedSharding(mesh, PartitionSpec())

    def place(x: Any) -> Any:
        if not hasattr(x, "shape"):
            return x
        return jax.device_put(x, split if tuple(x.shape)[:1] == (prompts,) else whole)

    return jax.tree_util.tree_map(place, tree)


def to_host(array: jax.Array) -> np.ndarray:
    """A result as one numpy array on this process, gathered from the other processes' devices
    when it spans several hosts.

    Example:
        >>> to_host(jnp.arange(3)).tolist()
        [0, 1, 2]
    """
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def initialize_distributed() -> None:
    """Joins a multi-process run (`jax.distributed.initialize`) before any device is used.

    The coordinator comes from `JAX_COORDINATOR_ADDRESS` (host:port; JAX reads it), the process
    count and this process's index from `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` when set;
    otherwise JAX detects them (SLURM, Open MPI, Cloud TPU, Kubernetes). Every process then
    sees every device, loads only its own devices' shards, and runs the same command; one
    process writes the results (`is_writer`).

    Raises:
        InvalidInputError: the environment names no usable cluster.
    """
    import os

    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(num_processes=None if count is None else int(count),
                                   process_id=None if index is None else int(index))
    except (ValueError, RuntimeError) as error:
        raise InvalidInputError(f"--distributed: {error} (set JAX_COORDINATOR_ADDRESS, "
                                "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM, "
                                "Open MPI or a Cloud TPU)") from error


def is_writer() -> bool:
    """Whether this process writes results and progress: the first process of a multi-process
    run, or the only one.

    Example:
        >>> is_writer()
        True
    """
    return jax.process_index() == 0


def broadcast_json(value: Any) -> Any:
    """The first process's value (anything JSON can hold) on every process, so that decisions
    every process must take alike (a chunk size from free memory, recorded progress) are
    taken once; with one process, the value itself.

    Example:
        >>> broadcast_json({"auto_chunk": 64})
        {'auto_chunk': 64}
    """
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_writer() else None
    size = int(multihost_utils.broadcast_one_to_all(np.int64(0 if data is None else data.size)))
    data = np.zeros(size, np.uint8) if data is None else data
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(data), np.uint8)))
