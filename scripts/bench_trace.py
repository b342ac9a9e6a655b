"""What a full hierarchy trace costs, before and after a change, measured in one run.

On the shipped planted pair (module granularity, log-probability of the answers), for the working
tree and for a git revision (`--before`, default the commit before the prepared pair: 0cea8de),
each in fresh processes with the persistent compilation cache on:

- cold: `trace_hierarchy` in a process whose compilation cache folder is empty (whole process,
  imports and loading included, and the trace alone);
- warm: the same in a second process reading that cache;
- steady: a second trace in the warm process (every program compiled);
- how many prefix passes (a forward pass of a model to a readout layer) and metric
  preparations the trace ran, and its sweeps and candidate runs.

Also, on the working tree: one exact weight sweep (the unit) and activation patching with prefix
reuse against every candidate rerun from the embeddings (scores checked equal).

    python scripts/bench_trace.py [--before REV]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "0cea8de"  # the last commit before the prepared pair and the chunk runner

CHILD = r"""
import inspect, json, sys, time
t0 = time.perf_counter()
import jaxpatch
from jaxpatch import compile_cache
compile_cache.enable(sys.argv[1])  # the command's default, explicit for both trees
from jaxpatch.studies.evaluate import default_pair_dir, load_planted
from jaxpatch.hierarchy import trace_hierarchy
import_s = time.perf_counter() - t0

passes, preparations = [0], [0]
def counting(fn, box):
    def wrapped(*args, **kwargs):
        box[0] += 1
        return fn(*args, **kwargs)
    return wrapped
for module in [m for name, m in list(sys.modules.items()) if name.startswith("jaxpatch")]:
    for name, box in (("prefix_pass", passes), ("endpoint_scores", preparations)):
        if callable(getattr(module, name, None)) and module.__name__ != "jaxpatch.pair" \
                and module.__name__ != "jaxpatch.engine.programs":
            setattr(module, name, counting(getattr(module, name), box))

pair = load_planted(default_pair_dir())
batch = jaxpatch.make_batch(pair.base.config, pair.prompts, "targets")
metric = jaxpatch.LogProb()
new_api = "pair" in inspect.signature(trace_hierarchy).parameters

def trace():
    if new_api:
        prepared = jaxpatch.prepare(pair.base, pair.donor, batch, positions="targets")
        return trace_hierarchy(prepared, metric, execution=jaxpatch.Execution(progress=False))
    return trace_hierarchy(pair.base, pair.donor, batch, metric)

t1 = time.perf_counter()
first = trace()
trace_s = time.perf_counter() - t1
process_s = time.perf_counter() - t0
counts = {"prefix_passes": passes[0], "metric_preparations": preparations[0]}
t1 = time.perf_counter()
second = trace()
steady_s = time.perf_counter() - t1
assert [r.role for r in first.rows] == [r.role for r in second.rows]
print(json.dumps({"import_s": import_s, "process_s": process_s, "trace_s": trace_s,
                  "steady_s": steady_s, "calls": first.calls, **counts,
                  "roles": {r.component: r.role for r in first.rows}}))
"""


def tree_at(revision: str, into: Path) -> Path:
    """The repository at `revision`, extracted into `into` (the working tree for None)."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=ROOT, check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True)
    archive_path = into.parent / f"{into.name}.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(tree: Path, cache: Path) -> dict:
    """Cold then warm processes of `CHILD` on one source tree with one cache folder."""
    env = {**os.environ, "PYTHONPATH": str(tree), "JAXPATCH_COMPILE_CACHE": str(cache)}
    runs = {}
    for which in ("cold", "warm"):
        done = subprocess.run([sys.executable, "-c", CHILD, str(cache)], env=env, cwd=tree,
                              check=True, capture_output=True, text=True)
        runs[which] = json.loads(done.stdout.strip().splitlines()[-1])
    return runs


def unit_costs() -> None:
    """One weight sweep and activation patching with and without prefix reuse (working tree)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import jaxpatch
    from jaxpatch.components import activation_sites
    from jaxpatch.engine.activation import _betas, _Operands, _program
    from jaxpatch.engine.programs import clean_sites
    from jaxpatch.studies.evaluate import default_pair_dir, load_planted

    planted = load_planted(default_pair_dir())
    config = planted.base.config
    batch = jaxpatch.make_batch(config, planted.prompts, "targets")
    pair = jaxpatch.prepare(planted.base, planted.donor, batch, positions="targets")
    metric, quiet = jaxpatch.LogProb(), jaxpatch.Execution(progress=False)
    items = jaxpatch.select(config, None, "module")

    from bench_attribution import best_of as best  # a sibling script

    sweep_s = best(lambda: jaxpatch.sweep(pair, metric, candidates=items, execution=quiet))
    reused = jaxpatch.activation_patching(pair, metric, execution=quiet)
    activation_s = best(lambda: jaxpatch.activation_patching(pair, metric, execution=quiet))
    state = pair.endpoints(metric).state
    sources = clean_sites(config, planted.donor.params, batch, None)
    program = jax.jit(_program(config, metric, 0))
    ops = _Operands(planted.base.params, sources, None, batch, state, None)
    sites = activation_sites(config)
    betas = {k: jnp.asarray(v) for k, v in _betas(config, items, len(items), sites).items()}
    full = np.asarray(program(betas, ops))
    np.testing.assert_allclose(full, reused.scores, rtol=1e-5, atol=1e-5)
    full_s = best(lambda: np.asarray(program(betas, ops)))
    print(f"one weight sweep of {len(items)} modules on a prepared pair: {sweep_s:.3f} s (warm)")
    print(f"activation patching: {activation_s:.3f} s with prefix reuse, {full_s:.3f} s rerunning "
          f"from the embeddings (ratio {full_s / activation_s:.2f}; scores equal)")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the git revision to compare with")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {f"before ({args.before})": tree_at(args.before, Path(tmp) / "before"),
                 "after (working tree)": ROOT}
        results = {name: measure(tree, Path(tmp) / f"cache-{i}")
                   for i, (name, tree) in enumerate(trees.items())}
    print(f"\n{'trace_hierarchy':22s} {'cold process':>12s} {'cold trace':>10s} {'warm process':>12s} "
          f"{'warm trace':>10s} {'steady':>7s} {'prefix passes':>13s} {'metric preps':>12s}")
    for name, r in results.items():
        cold, warm = r["cold"], r["warm"]
        print(f"{name:22s} {cold['process_s']:11.1f}s {cold['trace_s']:9.1f}s "
              f"{warm['process_s']:11.1f}s {warm['trace_s']:9.1f}s {warm['steady_s']:6.2f}s "
              f"{warm['prefix_passes']:13d} {warm['metric_preparations']:12d}")
    (before, after) = results.values()
    same = before["warm"]["roles"] == after["warm"]["roles"]
    print(f"roles identical: {same}; calls {after['warm']['calls']}")
    for key, label in (("process_s", "whole process"), ("trace_s", "trace")):
        print(f"after / before, {label}: cold {after['cold'][key] / before['cold'][key]:.2f}, "
              f"warm {after['warm'][key] / before['warm'][key]:.2f}")
    print(f"after / before, steady trace: {after['warm']['steady_s'] / before['warm']['steady_s']:.2f}")
    print()
    unit_costs()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
