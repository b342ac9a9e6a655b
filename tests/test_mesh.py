"""Sweeps on a device mesh (the candidates axis) equal one device's, on fake CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch.engine import programs
from jaxpatch.errors import InvalidInputError
from jaxpatch.examples import example_pair
from jaxpatch.mesh import make_mesh, parse_mesh


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
@pytest.mark.parametrize("granularity", ["module", "neuron"])
def test_a_sweep_split_across_two_devices_equals_one_device(granularity: str) -> None:
    pair = example_pair()
    metric = jaxpatch.VectorAnchor(layer=1)
    one = jaxpatch.sweep(pair.base, pair.donor, pair.batch, metric, granularity=granularity,
                         progress=False)
    two = jaxpatch.sweep(pair.base, pair.donor, pair.batch, metric, granularity=granularity,
                         chunk_size=5, progress=False, mesh={"candidates": 2})
    assert two.names == one.names
    np.testing.assert_allclose(two.scores, one.scores, rtol=0, atol=1e-5)
    meshed = [exe for key, exe in programs._COMPILED.items()
              if any(isinstance(k, jax.sharding.Mesh) for k in key[0])]
    assert meshed, "no program was compiled for the mesh"
    for exe in meshed:  # the work is split: each device holds its share of the candidates
        assert exe.output_shardings.spec == jax.sharding.PartitionSpec("candidates")
        assert len(exe.output_shardings.device_set) == 2


SCRIPT = r"""
import json, sys, numpy as np, jaxpatch
from jaxpatch.examples import example_pair
pair = example_pair()
out = {}
for metric in (jaxpatch.KLDivergence(), jaxpatch.VectorAnchor(layer=1)):
    one = jaxpatch.sweep(pair.base, pair.donor, pair.batch, metric, granularity="neuron",
                         progress=False).scores
    for n in (8, 4, 2, 1):
        split = jaxpatch.sweep(pair.base, pair.donor, pair.batch, metric, granularity="neuron",
                               progress=False, mesh=f"candidates={n}").scores
        out[f"{metric.name} {n}"] = float(np.abs(split - one).max())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_mesh_shapes_on_eight_devices_equal_one_device() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                      "--xla_backend_optimization_level=0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    gaps = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(gaps) == 8 and max(gaps.values()) <= 1e-5, gaps


def test_meshes_are_parsed_and_refused_by_name() -> None:
    assert parse_mesh("candidates=2") == {"candidates": 2}
    with pytest.raises(InvalidInputError, match="expected NAME=SIZE"):
        parse_mesh("candidates")
    with pytest.raises(InvalidInputError, match="mesh axis 'model' is not one jaxpatch splits"):
        make_mesh({"candidates": 1, "model": 1})
    with pytest.raises(InvalidInputError, match="needs 4096 devices"):
        make_mesh("candidates=4096")
    assert make_mesh(None) is None


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
def test_activation_patching_split_across_two_devices_equals_one_device() -> None:
    pair = example_pair()
    metric = jaxpatch.KLDivergence()
    one = jaxpatch.activation_patching(pair.base, pair.donor, pair.batch, metric,
                                       granularity="neuron", progress=False)
    two = jaxpatch.activation_patching(pair.base, pair.donor, pair.batch, metric,
                                       granularity="neuron", chunk_size=7, progress=False,
                                       mesh="candidates=2")
    assert two.names == one.names
    np.testing.assert_allclose(two.scores, one.scores, rtol=0, atol=1e-5)
    meshed = [exe for key, exe in programs._COMPILED.items()
              if key[0][0] == "activation" and isinstance(key[0][-1], jax.sharding.Mesh)]
    assert meshed and all(len(exe.output_shardings.device_set) == 2 for exe in meshed)
