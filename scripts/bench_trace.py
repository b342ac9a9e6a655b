"""What a full hierarchy trace costs, next to one weight-patching sweep, and what prefix reuse
buys activation patching.

On the shipped planted pair (module granularity, log-probability of the answers), measures:

- one exact weight-patching sweep (denoise), the unit everything is compared to;
- activation patching (denoise) as jaxpatch runs it (a candidate in block i starts from the
  cached stream before block i), and the same candidates rerun from the embeddings (the
  reference without prefix reuse, built from the same program), scores checked equal;
- `trace_hierarchy` end to end: its sweeps, candidate runs (each at most one forward pass) and
  seconds per step.

Times are warm (each program compiled once before timing) unless marked cold.

    python scripts/bench_trace.py
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxpatch import Execution, LogProb, activation_patching, make_batch, prepare, select, sweep  # noqa: E402  # noqa: E402
from jaxpatch.components import activation_sites  # noqa: E402
from jaxpatch.evaluate import default_pair_dir, load_planted  # noqa: E402
from jaxpatch.hierarchy import trace_hierarchy  # noqa: E402
from jaxpatch.engine.activation import _betas, _Operands, _program  # noqa: E402
from jaxpatch.engine.programs import clean_sites  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    """The best of `repeats` wall times of `fn()` (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    pair = load_planted(default_pair_dir())
    base, donor, config = pair.base, pair.donor, pair.base.config
    batch = make_batch(config, pair.prompts, "targets")
    metric = LogProb()
    items = select(config, None, "module")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"pair: {config.n_layers} blocks, d_model {config.d_model}, {len(items)} modules, "
          f"{batch.tokens.shape[0]} prompts of {batch.tokens.shape[1]} tokens")

    def run_sweep():
        return sweep(prepare(base, donor, batch), metric, candidates=items, execution=Execution(progress=False))

    cold = time.perf_counter()
    reference_sweep = run_sweep()
    cold = time.perf_counter() - cold
    sweep_s = timed(run_sweep)
    print(f"weight sweep: {len(items)} candidates, {sweep_s:.2f} s warm ({cold:.2f} s cold)")

    def run_activation():
        return activation_patching(prepare(base, donor, batch), metric, execution=Execution(progress=False))

    reused = run_activation()
    activation_s = timed(run_activation)

    # The reference: every candidate reruns the model from the embeddings.
    state = metric.prepare(config, base.params, donor.params, batch)
    sources = clean_sites(config, donor.params, batch, None)
    sites = activation_sites(config)
    program = jax.jit(_program(config, metric, 0))
    ops = _Operands(base.params, sources, None, batch, state, None)
    betas = {k: jnp.asarray(v) for k, v in _betas(config, items, len(items), sites).items()}
    full = np.asarray(program(betas, ops))
    full_s = timed(lambda: np.asarray(program(betas, ops)))
    np.testing.assert_allclose(full, reused.scores, rtol=1e-5, atol=1e-5)
    print(f"activation patching: {activation_s:.2f} s with prefix reuse, {full_s:.2f} s rerunning "
          f"from the embeddings (ratio {full_s / activation_s:.2f}; scores equal)")

    start = time.perf_counter()
    traced = trace_hierarchy(prepare(base, donor, batch), metric)
    cold_trace = time.perf_counter() - start
    start = time.perf_counter()
    traced = trace_hierarchy(prepare(base, donor, batch), metric)
    trace_s = time.perf_counter() - start
    calls = traced.calls
    print(f"trace_hierarchy: {trace_s:.1f} s warm ({cold_trace:.1f} s cold) = "
          f"{trace_s / sweep_s:.0f} weight sweeps; {calls['candidate_runs']} candidate runs "
          f"(<= forward passes) = {calls['candidate_runs'] / len(items):.1f} sweeps' worth")
    print("  calls: " + ", ".join(f"{k} {v}" for k, v in calls.items()))
    print("  steps: " + ", ".join(f"{k} {v:.1f}" for k, v in traced.timing.items()))
    assert np.isfinite(reference_sweep.scores).all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
