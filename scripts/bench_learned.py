"""Benchmark: the cost of one learned patch, in forward passes and seconds, next to an
exhaustive exact sweep at the same granularity.

On the shipped planted pair (`jaxpatch.studies.evaluate.default_pair_dir`; log-probability of the
answers, denoise), measures in one process, each after a warm-up call that compiles it:
  - one forward pass of the model on the patching prompts (the unit),
  - one learned patch (`jaxpatch.learn_patch`, the default 200 steps), and
  - the exhaustive exact sweep (`jaxpatch.sweep`) over the same components,
at module and neuron granularity, and prints each in seconds and in forward-pass equivalents
(target of the learned-patch issue: at most 300 for one neuron-level patch).

Run: python scripts/bench_learned.py [--steps 200]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax

import jaxpatch
from jaxpatch.metrics import readout
from jaxpatch.studies.evaluate import default_pair_dir, load_planted


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls (after one untimed call that compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    pair = load_planted(default_pair_dir())
    config = pair.base.config
    batch = jaxpatch.make_batch(config, pair.prompts, "targets")
    metric = jaxpatch.LogProb()
    forward = jax.jit(lambda params: readout(config, params, batch, None))
    unit = best_of(lambda: forward(pair.base.params), 20)
    print(f"machine: {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(f"one forward pass ({batch.tokens.shape[0]} prompts x {batch.tokens.shape[1]} tokens): "
          f"{unit * 1e3:.2f} ms")
    for granularity in ("module", "neuron"):
        # a fresh prepared pair per call: each time includes the pair's preparation
        learned_s = best_of(lambda g=granularity: jaxpatch.learn_patch(
            jaxpatch.prepare(pair.base, pair.donor, batch), metric, granularity=g,
            training=jaxpatch.GateTraining(steps=args.steps)).effect, 2)
        sweep_s = best_of(lambda g=granularity: jaxpatch.sweep(
            jaxpatch.prepare(pair.base, pair.donor, batch), metric, granularity=g,
            execution=jaxpatch.Execution(progress=False)).effect, 2)
        n = len(jaxpatch.select(config, None, granularity))
        print(f"{granularity} ({n} components): learned patch {learned_s:.2f} s = "
              f"{learned_s / unit:.0f} forward passes ({args.steps} steps); exhaustive exact sweep "
              f"{sweep_s:.2f} s = {sweep_s / unit:.0f} forward passes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
