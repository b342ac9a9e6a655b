"""Device meshes: where a sweep's work is split across devices, in one documented place.

A mesh has named axes; jaxpatch maps its logical axes onto them here and nowhere else:

    candidates   the candidates of a chunk (the leading axis of its coefficients): each device
                 scores its share of the chunk with the whole model (data parallel over
                 candidates; params and prompts replicated)

That is the one axis implemented so far: a mesh naming any other axis (`model` for tensor
parallel heads and neurons, `data` for prompts) is refused by name. On one device, or without a
mesh, nothing changes. Scores on a mesh equal one device's to float32 rounding (the same
programs, split along the chunk).
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpatch.errors import InvalidInputError

__all__ = ["MeshLike", "MESH_AXES", "make_mesh", "parse_mesh", "candidate_devices",
           "shard_candidates", "replicate", "candidate_specs"]

MeshLike = Union[Mesh, Mapping[str, int], str]
"""A `jax.sharding.Mesh`, axis sizes by name (`{"candidates": 4}`), or `"candidates=4"`."""

MESH_AXES: dict[str, str] = {"candidates": "the candidates of a chunk, split across devices"}
"""The mesh axes jaxpatch uses, with what each splits."""


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


def candidate_devices(mesh: Mesh | None) -> int:
    """How many devices share a chunk's candidates (1 without a mesh).

    Example:
        >>> candidate_devices(None), candidate_devices(make_mesh({"candidates": 1}))
        (1, 1)
    """
    return 1 if mesh is None else int(mesh.shape.get("candidates", 1))


def shard_candidates(mesh: Mesh, tree: Any) -> Any:
    """Places every array of `tree` split along its leading (candidate) axis.

    Example:
        >>> x = shard_candidates(make_mesh({"candidates": 1}), {"a": jnp.ones((2, 3))})
        >>> x["a"].sharding.spec
        P('candidates',)
    """
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec("candidates")))


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
    sharding = NamedSharding(mesh, PartitionSpec("candidates"))
    return {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for name, s in specs.items()}
