"""Work on a device mesh (candidates, model and data axes) equals one device's, on fake CPU
devices; a model-axis load reads each device's shard only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import jax
import numpy as np
import optax
import pytest
from golden import FIXTURES

import jaxpatch
from jaxpatch.cli import main
from jaxpatch.engine import programs
from jaxpatch.errors import InvalidInputError, TensorShapeError
from jaxpatch.examples import example_pair, random_pair
from jaxpatch.io import safetensors
from jaxpatch.io.hf import load_hf
from jaxpatch.mesh import default_mesh, make_mesh, parse_mesh
from jaxpatch.pair import placed_on


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
@pytest.mark.parametrize("granularity", ["module", "neuron"])
def test_a_sweep_split_across_two_devices_equals_one_device(granularity: str) -> None:
    pair = example_pair()
    metric = jaxpatch.VectorAnchor(layer=1)
    one = jaxpatch.sweep(jaxpatch.prepare(pair.base, pair.donor, pair.batch), metric, granularity=granularity, execution=jaxpatch.Execution(progress=False))
    two = jaxpatch.sweep(jaxpatch.prepare(pair.base, pair.donor, pair.batch, mesh={"candidates": 2}), metric, granularity=granularity, execution=jaxpatch.Execution(chunk_size=5, progress=False))
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
from jaxpatch.hierarchy import TraceSearch, trace_hierarchy
example = example_pair()
prepared = {}
def pair(mesh):  # one prepared pair per mesh, reused by every method (as a user would)
    if mesh not in prepared:
        prepared[mesh] = jaxpatch.prepare(example.base, example.donor, example.batch, mesh=mesh)
    return prepared[mesh]
kl, anchor = jaxpatch.KLDivergence(), jaxpatch.VectorAnchor(layer=1)
quiet = jaxpatch.Execution(progress=False)
runs = {
    "sweep kl": lambda mesh: jaxpatch.sweep(pair(mesh), kl, granularity="neuron",
                                            execution=quiet).scores,
    "sweep anchor": lambda mesh: jaxpatch.sweep(pair(mesh), anchor, granularity="head",
                                                execution=quiet).scores,
    "attribution": lambda mesh: jaxpatch.attribute(pair(mesh), kl, granularity="neuron").scores,
    "activation": lambda mesh: jaxpatch.activation_patching(
        pair(mesh), anchor, granularity="module", execution=quiet).scores,
    "trace": lambda mesh: np.array([
        [r.weight_score, r.activation_score, -1.0 if r.supplied is None else r.supplied]
        for r in trace_hierarchy(pair(mesh), anchor, execution=quiet,
                                 search=TraceSearch(depth=1, top_targets=3, max_groups=3)).rows]),
}
out = {}
for name, run in runs.items():
    one = run(None)
    for mesh in sys.argv[1:]:
        out[f"{name} {mesh}"] = float(np.abs(run(mesh) - one).max())
print(json.dumps(out))
"""

# Mixed meshes cover every axis split 2 to 4 ways; one axis split alone is tested with two
# devices below (model=2, data=2) and by the two-process tests.
MESHES = ["candidates=4,model=2", "candidates=2,model=4", "candidates=2,model=2,data=2"]


@pytest.mark.slow
def test_mesh_shapes_on_eight_devices_equal_one_device() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                      "--xla_backend_optimization_level=0",
           "JAXPATCH_COMPILE_CACHE": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *MESHES], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    gaps = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(gaps) == 5 * len(MESHES) and max(gaps.values()) <= 1e-5, gaps


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
@pytest.mark.parametrize("mesh", ["model=2", "data=2"])
def test_model_and_data_axes_split_the_work_and_equal_one_device(mesh: str) -> None:
    pair = example_pair()
    tokens = np.random.default_rng(0).integers(1, pair.base.config.vocab_size, (4, 6))
    prompts = jaxpatch.make_batch(pair.base.config, [jaxpatch.Prompt(tuple(map(int, row)))
                                                     for row in tokens])
    metric = jaxpatch.VectorAnchor(layer=1)
    one = jaxpatch.sweep(jaxpatch.prepare(pair.base, pair.donor, prompts), metric, granularity="neuron", execution=jaxpatch.Execution(progress=False))
    two = jaxpatch.sweep(jaxpatch.prepare(pair.base, pair.donor, prompts, mesh=mesh), metric, granularity="neuron", execution=jaxpatch.Execution(progress=False))
    np.testing.assert_allclose(two.scores, one.scores, rtol=0, atol=1e-5)
    attributed = [jaxpatch.attribute(jaxpatch.prepare(pair.base, pair.donor, prompts, mesh=m), metric, granularity="neuron").scores for m in (None, mesh)]
    np.testing.assert_allclose(attributed[1], attributed[0], rtol=0, atol=1e-5)
    placed, _, batch = placed_on(make_mesh(mesh), pair.base, pair.donor, prompts)
    up = placed.params["layers"][0]["mlp"]["up_proj"]["weight"]
    if mesh == "model=2":  # each device holds half the neurons
        assert {s.data.shape for s in up.addressable_shards} == {(up.shape[0], up.shape[1] // 2)}
    else:  # each device holds half the prompts
        tokens = batch.tokens
        assert {s.data.shape[0] for s in tokens.addressable_shards} == {tokens.shape[0] // 2}


class _ReadRecorder(np.ndarray):
    """A mapped checkpoint tensor that records the size of every slice read from it (views
    made by transposing and reshaping stay recorders)."""

    largest: ClassVar[list[int]] = [0]

    def __getitem__(self, index):  # type: ignore[override]
        out = super().__getitem__(index)
        _ReadRecorder.largest[0] = max(_ReadRecorder.largest[0], np.asarray(out).nbytes)
        return out


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
def test_model_axis_load_reads_each_devices_shard_only(tmp_path: Path, monkeypatch) -> None:
    """With `model=2`, the largest slice read from the file is half the largest tensor (an
    up_proj of 8 MiB): no tensor split along `model` is read whole."""
    base, _ = random_pair("llama", d_model=64, d_ff=32768, n_layers=1)
    jaxpatch.save(base, tmp_path / "wide")
    mapped = safetensors.map_tensor
    monkeypatch.setattr(safetensors, "map_tensor",
                        lambda info: mapped(info).view(_ReadRecorder))
    split = jaxpatch.load(tmp_path / "wide", mesh="model=2")
    largest = max(x.nbytes for x in jax.tree_util.tree_leaves(split.params))
    assert largest == 64 * 32768 * 4 and _ReadRecorder.largest[0] == largest // 2
    whole = jaxpatch.load(tmp_path / "wide")
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(split.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name, leaf in jaxpatch.flatten_params(split.params).items():
        if "proj" in name and "weight" in name:  # every projection split in two
            assert all(s.data.size * 2 == leaf.size for s in leaf.addressable_shards), name


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
def test_a_large_tensor_that_cannot_split_is_refused(tmp_path: Path) -> None:
    base, _ = random_pair("llama", n_heads=3, n_kv_heads=3, d_model=48, head_dim=16)
    jaxpatch.save(base, tmp_path / "odd")
    with pytest.raises(TensorShapeError, match=r"q_proj\.weight.*does not split along the mesh's "
                                               r"model axis of 2"):
        load_hf(tmp_path / "odd", mesh=make_mesh("model=2"), max_whole_bytes=1024)


def test_meshes_are_parsed_and_refused_by_name() -> None:
    assert parse_mesh("candidates=2,model=1") == {"candidates": 2, "model": 1}
    with pytest.raises(InvalidInputError, match="expected NAME=SIZE"):
        parse_mesh("candidates")
    with pytest.raises(InvalidInputError, match="mesh axis 'pipeline' is not one jaxpatch splits"):
        make_mesh({"candidates": 1, "pipeline": 1})
    with pytest.raises(InvalidInputError, match="needs 4096 devices"):
        make_mesh("candidates=4096")
    assert make_mesh(None) is None
    assert dict(default_mesh().shape) == {"candidates": len(jax.devices())}


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
def test_activation_patching_split_across_two_devices_equals_one_device() -> None:
    pair = example_pair()
    metric = jaxpatch.KLDivergence()
    one = jaxpatch.activation_patching(jaxpatch.prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=jaxpatch.Execution(progress=False))
    two = jaxpatch.activation_patching(jaxpatch.prepare(pair.base, pair.donor, pair.batch, mesh="candidates=2"), metric, granularity="neuron", execution=jaxpatch.Execution(chunk_size=7, progress=False))
    assert two.names == one.names
    np.testing.assert_allclose(two.scores, one.scores, rtol=0, atol=1e-5)
    meshed = [exe for key, exe in programs._COMPILED.items()
              if key[0][0] == "activation" and isinstance(key[0][-1], jax.sharding.Mesh)]
    assert meshed and all(len(exe.output_shardings.device_set) == 2 for exe in meshed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("command, mesh", [("sweep", "candidates=2"), ("attribute", "model=2")])
def test_two_processes_give_the_single_process_result(command: str, mesh: str, tmp_path: Path,
                                                      donor_dir: Path) -> None:
    """`jaxpatch --distributed` in two CPU processes (one device each, a localhost
    coordinator; with `model=2` each reads half of every split tensor): the first process
    writes the single process's scores, the second nothing; started again, both replay the
    first's progress log (a process that ran chunks the other replayed would wait on it
    forever)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"tokens": [3 + i, 7, 11 + i, 5]}) + "\n"
                               for i in range(4)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAXPATCH_COMPILE_CACHE": "0"}

    def args(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "jaxpatch.cli", *extra, command, "--base",
                str(FIXTURES / "llama-gqa"), "--donor", str(donor_dir), "--prompts", str(prompts),
                "--granularity", "neuron", "--metric", "kl", "--no-progress", "--out", str(out)]

    single = subprocess.run(args(tmp_path / "one"), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr

    def two_processes() -> list[tuple[str, str]]:
        port = _free_port()
        processes = [subprocess.Popen(
            args(tmp_path / "two", "--distributed") + ["--mesh", mesh],
            env={**env, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outputs = [p.communicate(timeout=600) for p in processes]
        assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
        assert "wrote" in outputs[0][0] and "wrote" not in outputs[1][0]
        return outputs

    two_processes()
    one, two = (json.loads((tmp_path / name / "scores.json").read_text())["components"]
                for name in ("one", "two"))
    assert [c["name"] for c in one] == [c["name"] for c in two]
    np.testing.assert_allclose([c["score"] for c in two], [c["score"] for c in one], atol=1e-5)
    again = two_processes()
    assert "resuming the run" in again[0][1]
    resumed = json.loads((tmp_path / "two" / "scores.json").read_text())["components"]
    assert [c["score"] for c in resumed] == [c["score"] for c in two]


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two (fake) devices")
def test_a_learned_patch_on_a_mesh_equals_one_device() -> None:
    """With plain gradient descent the gates follow the gradients, so equal gradients give
    equal gates. (Adam is no test of this: it moves a component whose gradient is rounding
    noise by the learning rate either way, so float32 rounding changes what it selects.)"""
    pair = example_pair()
    metric = jaxpatch.VectorAnchor(layer=1)
    descent = optax.sgd(1.0)
    learned = [jaxpatch.learn_patch(jaxpatch.prepare(pair.base, pair.donor, pair.batch, mesh=mesh), metric, training=jaxpatch.GateTraining(steps=30, optimizer=descent))
               for mesh in (None, "model=2", "data=2")]
    for other in learned[1:]:
        assert other.selected == learned[0].selected
        np.testing.assert_allclose(other.probabilities, learned[0].probabilities, atol=1e-6)
        assert abs(other.effect - learned[0].effect) <= 1e-5


@pytest.mark.skipif(len(jax.devices()) != 2, reason="needs exactly two (fake) devices")
def test_commands_use_every_device_by_default_and_record_the_mesh(tmp_path: Path,
                                                                   donor_dir: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"tokens": [3, 7, 11]}\n{"tokens": [5, 9, 2]}\n')
    out = tmp_path / "run"
    assert main(["sweep", "--base", str(FIXTURES / "llama-gqa"), "--donor", str(donor_dir),
                 "--prompts", str(prompts), "--metric", "kl", "--no-progress",
                 "--out", str(out)]) == 0
    header = json.loads((out / "progress.jsonl").read_text().splitlines()[0].split(" ", 1)[1])
    assert header["settings"]["arguments"]["mesh"] == "candidates=2"
