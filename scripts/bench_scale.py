"""Benchmark: sweep throughput against device count and mesh shape.

Builds the `bench_sweep.py` pair of a preset and runs the same module sweep (and a neuron sweep
of the last block's MLP) in fresh processes, each seeing N devices: the accelerators JAX finds,
or N fake CPU devices (`--xla_force_host_platform_device_count`) on a CPU, where the devices
share the machine's cores, so the figure is the mesh's overhead, not a speed-up. Per process
and mesh it prints the steady-state rate (the second of two runs, compiled programs cached),
its ratio to one device without a mesh, and the largest difference of the scores from it.

Also the cost of the mesh code path itself: one device without a mesh against one device on a
`candidates=1` mesh (the issue's target: under 5%).

Run: python scripts/bench_scale.py [--preset NAME] [--devices 1,2,4,8] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_sweep import MAKE_PAIR, PRESETS, run  # a sibling script

SWEEP = r"""
import json, sys, time
import jax, numpy as np, jaxpatch
from jaxpatch.metrics import VectorAnchor
from jaxpatch.prompts import Prompt, make_batch
folder, dtype, meshes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base = jaxpatch.load(folder + "/base", dtype=dtype)
donor = jaxpatch.load(folder + "/donor", dtype=dtype)
tokens = np.load(folder + "/tokens.npy")
batch = make_batch(base.config, [Prompt(tuple(map(int, row))) for row in tokens])
last = base.config.n_layers - 1
metric = VectorAnchor(layer=last)
selections = {"module": ("module", "layers.*.self_attn.*_proj | layers.*.mlp.*_proj"),
              "neuron": ("neuron", f"layers.{last}.mlp[neuron=0-255]")}
out = []
for kind, (granularity, select) in selections.items():
    reference = None
    for mesh in meshes:
        runs = [jaxpatch.sweep(jaxpatch.prepare(base, donor, batch, mesh=mesh), metric,
                               granularity=granularity, selector=select,
                               execution=jaxpatch.Execution(progress=False)) for _ in range(2)]
        steady = runs[1]
        reference = steady.scores if reference is None else reference
        out.append({"kind": kind, "mesh": mesh or "none", "devices": len(jax.devices()),
                    "candidates": len(steady.names),
                    "candidates_per_s": steady.timing["candidates_per_s"],
                    "sweep_s": steady.timing["sweep_s"],
                    "max_gap": float(np.abs(steady.scores - reference).max()),
                    "device": jax.devices()[0].device_kind})
print(json.dumps(out))
"""


def meshes_for(count: int) -> list[str | None]:
    """The meshes measured on `count` devices (None: no mesh)."""
    if count == 1:
        return [None, "candidates=1"]
    return [f"candidates={count}", f"model={count}", f"candidates={count // 2},model=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--devices", default="1,2,4,8",
                        help="device counts (fake CPU devices on a CPU; default 1,2,4,8)")
    parser.add_argument("--layers", type=int, help="fewer blocks than the preset")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    shape = dict(preset["shape"], **({"n_layers": args.layers} if args.layers else {}))
    counts = [int(n) for n in args.devices.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        run(MAKE_PAIR, json.dumps(shape), folder, str(preset["prompts"]), str(preset["length"]))
        for count in counts:
            flags = os.environ.get("XLA_FLAGS", "")
            env = {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}",
                   "JAXPATCH_COMPILE_CACHE": "0"}
            rows += _rows(folder, preset["dtype"], count, env)
    print(json.dumps(rows, indent=1))
    single = {r["kind"]: r["candidates_per_s"] for r in rows
              if r["devices"] == 1 and r["mesh"] == "none"}
    print(f"\n{'sweep':7s} {'devices':>7s} {'mesh':28s} {'cand/s':>8s} {'vs 1':>6s} {'gap':>8s}")
    for r in rows:
        print(f"{r['kind']:7s} {r['devices']:7d} {r['mesh']:28s} {r['candidates_per_s']:8.1f} "
              f"{r['candidates_per_s'] / single[r['kind']]:6.2f} {r['max_gap']:8.1e}")
    for kind, rate in single.items():
        meshed = next(r["candidates_per_s"] for r in rows
                      if r["kind"] == kind and r["mesh"] == "candidates=1")
        print(f"{kind}: one device on a candidates=1 mesh costs "
              f"{100 * (rate / meshed - 1):+.1f}% against no mesh (target under 5%)")
    print(f"device: {rows[0]['device']}")


def _rows(folder: str, dtype: str, count: int, env: dict[str, str]) -> list[dict[str, Any]]:
    """The rows of one process seeing `count` devices (its last line is a JSON list)."""
    out = subprocess.run([sys.executable, "-c", SWEEP, folder, dtype,
                          json.dumps(meshes_for(count))], check=True, capture_output=True,
                         text=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
