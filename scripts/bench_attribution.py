"""Benchmark: first-order attribution of every module, head and neuron, in forward passes.

On the benchmark pair of `bench_sweep.py` (6 layers, d_model 512, 8 x 128 tokens, vector anchor
after the last block at the last position), measures in one process, after compilation:
  - one forward pass to the anchor (the reference unit: the cheapest forward that yields the
    metric, the last block computed at the readout position only), and
  - the first-order scores of every module, head and neuron (one forward and one backward over
    the patch coefficients, then the per-component sums),
and prints each as a multiple of the forward pass (target: at most 4). The two are timed in
alternation, best of 7 each, so that both see the same machine. It prints the gradient's FLOP
rate (three times the forward's FLOPs: the forward, the input gradients and the coefficient
derivatives) against this machine's measured float32 matmul rate, and checks the first-order
scores against central differences of exact patching on a few modules.

Then, on the shipped planted pair (`jaxpatch.studies.evaluate.default_pair_dir`), it patches every
neuron exactly (denoise, log-probability of the answers) and reports, for first-order and
integrated-gradient rankings, the share of the exhaustive exact top 20 that a shortlist of the
top-ranked neurons catches, at shortlist sizes up to 10% of the neurons (target: at least 0.9
with at most 10% patched exactly), and what `localize` reports with its random controls.

Then, on a pair with Qwen2.5-0.5B's 116,736 neurons (24 blocks, MLP 4864; d_model cut to 64 so
that a CPU runs it), `attribute(..., granularity="neuron")` end to end against its gradient
alone, timed in alternation: what the component lists, selection, per-component sums and checks
add in Python (target: the whole within 1.5x of the gradient).

Run: python scripts/bench_attribution.py [--skip-recall] [--only-overhead]
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Callable

import jax
import numpy as np
from bench_sweep import LENGTH, MATMUL, PROMPTS, SHAPE, forward_flops, run

import jaxpatch
from jaxpatch import Execution, Verification, prepare
from jaxpatch.attribution import alpha_gradients, component_scores, planned_gradient_bytes
from jaxpatch.metrics import VectorAnchor, readout
from jaxpatch.prompts import Prompt, make_batch


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls after one warm-up call."""
    return alternating_best({"f": fn}, repeats)["f"]


def alternating_best(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """The fastest time of each function, timed in alternation (after one warm-up call each) so
    that a change in the machine's load affects all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--skip-recall", action="store_true", help="only the cost part")
    parser.add_argument("--only-overhead", action="store_true",
                        help="only attribution end to end against its gradient (116,736 neurons)")
    args = parser.parse_args()
    if args.only_overhead:
        end_to_end_overhead()
        return
    config = jaxpatch.ModelConfig(**SHAPE)
    base_params = jaxpatch.init_params(config, jax.random.key(0), scale=0.05)
    leaves, treedef = jax.tree_util.tree_flatten(base_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    donor_params = jax.tree_util.tree_unflatten(
        treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    base, donor = jaxpatch.Model(config, base_params), jaxpatch.Model(config, donor_params)
    tokens = np.random.default_rng(0).integers(1, config.vocab_size, (PROMPTS, LENGTH))
    batch = make_batch(config, [Prompt(tuple(map(int, row))) for row in tokens])
    metric = VectorAnchor(layer=config.n_layers - 1)
    pair = prepare(base, donor, batch)
    pair.endpoints(metric)  # the metric fitted once, outside the timings

    times = alternating_best({
        "forward": lambda: readout(config, base.params, batch, metric.layer),
        "gradient": lambda: alpha_gradients(pair, metric)})
    forward_s, grads_s = times["forward"], times["gradient"]
    grads = alpha_gradients(pair, metric)
    print(f"forward pass to the anchor: {forward_s * 1e3:.1f} ms")
    print(f"gradient over all patch coefficients: {grads_s * 1e3:.1f} ms "
          f"= {grads_s / forward_s:.2f} forward passes")
    for granularity in ("module", "head", "neuron"):
        items = jaxpatch.select(config, None, granularity)
        sum_s = best_of(functools.partial(component_scores, config, grads, items), repeats=3)
        total = grads_s + sum_s
        print(f"{granularity:>7}: {len(items):5d} components, {total * 1e3:.1f} ms "
              f"= {total / forward_s:.2f} forward passes (target <= 4)")
    flops = 3 * forward_flops(SHAPE, PROMPTS, LENGTH)
    matmul = run(MATMUL, "float32")["flops_per_s"]
    print(f"FLOP rate: {flops / grads_s / 1e9:.1f} GFLOP/s on the gradient's {flops / 1e9:.1f} GFLOP; "
          f"measured float32 matmul rate {matmul / 1e9:.1f} GFLOP/s "
          f"({100 * flops / grads_s / matmul:.0f}%)")
    memory_and_variants(pair, metric)

    # What is timed is the derivative of exact patching: check it by central differences.
    modules = jaxpatch.select(config, "layers.5.mlp | layers.2.self_attn.o_proj", "module")
    first_order = component_scores(config, grads, modules)
    eps = 1e-2
    patches = {f"{c.name} {sign:+d}": jaxpatch.Patch.from_components(config, [c]).scale(sign * eps)
               for c in modules for sign in (1, -1)}
    exact = jaxpatch.sweep(pair, metric, candidates=patches, execution=Execution(progress=False))
    central = (exact.scores[0::2] - exact.scores[1::2]) / (2 * eps)
    print(f"first-order vs central differences of exact patching on {len(modules)} modules: "
          f"max relative difference {np.max(np.abs(first_order - central) / np.abs(central)):.2e}")
    end_to_end_overhead()
    if not args.skip_recall:
        planted_recall()


def end_to_end_overhead() -> None:
    """`attribute` over 116,736 neurons end to end against `alpha_gradients` alone."""
    from jaxpatch.attribution import attribute
    from jaxpatch.examples import random_pair

    base, donor = random_pair("qwen2", n_layers=24, d_model=64, n_heads=4, n_kv_heads=2,
                              head_dim=16, d_ff=4864, vocab_size=512)
    tokens = np.random.default_rng(0).integers(1, 512, (8, 32))
    batch = make_batch(base.config, [Prompt(tuple(map(int, row))) for row in tokens])
    metric = VectorAnchor(layer=base.config.n_layers - 1)
    pair = prepare(base, donor, batch)
    pair.endpoints(metric)  # the metric fitted once, outside the timings
    times = alternating_best({
        "gradient": lambda: alpha_gradients(pair, metric),
        "attribute": lambda: attribute(pair, metric, granularity="neuron").scores})
    n = len(jaxpatch.select(base.config, None, "neuron"))
    print(f"attribution of {n} neurons end to end: {times['attribute'] * 1e3:.0f} ms, its gradient "
          f"{times['gradient'] * 1e3:.0f} ms: {times['attribute'] / times['gradient']:.2f}x "
          "(target <= 1.5x)")


def memory_and_variants(pair, metric) -> None:
    """The block-by-block gradient (remat) and one integrated-gradient step, in forward passes,
    and XLA's planned temporary memory of the forward pass and of both gradients."""
    config, base, batch = pair.config, pair.base, pair.batch
    times = alternating_best({
        "forward": lambda: readout(config, base.params, batch, metric.layer),
        "remat": lambda: alpha_gradients(pair, metric, execution=Execution(remat=True)),
        "ig": lambda: alpha_gradients(pair, metric, steps=2, method="integrated-gradients")},
        repeats=3)
    forward_s = times["forward"]
    print(f"block by block (remat=True): {times['remat'] * 1e3:.1f} ms = "
          f"{times['remat'] / forward_s:.2f} forward passes")
    print(f"integrated gradients: {times['ig'] / 2 * 1e3:.1f} ms per step = "
          f"{times['ig'] / 2 / forward_s:.2f} forward passes")
    forward_program = jax.jit(lambda p: readout(config, p, batch, metric.layer)).lower(base.params)
    mib = 2.0**20
    params = sum(x.nbytes for x in jax.tree_util.tree_leaves(base.params)) / mib
    analysis = forward_program.compile().memory_analysis()
    assert analysis is not None, "this backend reports no memory analysis"
    forward_bytes = analysis.temp_size_in_bytes / mib
    one = planned_gradient_bytes(pair, metric) / mib
    blockwise = planned_gradient_bytes(pair, metric, remat=True) / mib
    print(f"planned temporary memory (params {params:.0f} MiB each model): forward {forward_bytes:.0f} MiB, "
          f"gradient {one:.0f} MiB, block by block {blockwise:.0f} MiB")


def planted_recall(recall_k: int = 20, budget: float = 0.1, controls: int = 6) -> None:
    """Narrow-then-verify recall on the shipped planted pair."""
    from jaxpatch.attribution import attribute
    from jaxpatch.localization import localize
    from jaxpatch.metrics import LogProb
    from jaxpatch.studies.evaluate import default_pair_dir, load_planted

    pair = load_planted(default_pair_dir())
    config, metric = pair.base.config, LogProb()
    batch = make_batch(config, pair.prompts, "targets")
    prepared = prepare(pair.base, pair.donor, batch)
    quiet = Execution(progress=False)
    exact = jaxpatch.sweep(prepared, metric, granularity="neuron", execution=quiet)
    truth = set(np.argsort(-np.abs(exact.effect), kind="stable")[:recall_k].tolist())
    n = len(exact.names)
    sizes = [recall_k, 2 * recall_k, int(budget * n)]
    print(f"planted pair: {n} neurons; recall of the exhaustive exact top {recall_k} by a shortlist of "
          + ", ".join(f"{k} ({k / n:.1%})" for k in sizes))
    for method in ("first-order", "integrated-gradients"):
        scored = attribute(prepared, metric, granularity="neuron", method=method)
        ranked = np.argsort(-np.abs(scored.effect), kind="stable")
        recalls = [len(truth & set(ranked[:k].tolist())) / recall_k for k in sizes]
        print(f"{method:>21}: " + ", ".join(f"{r:.2f}" for r in recalls))
        verify = Verification(top_k=int(budget * n) - controls, controls=controls,
                              exhaustive=True, recall_k=recall_k)
        report = localize(prepared, metric, granularity="neuron", method=method, verify=verify,
                          execution=quiet)
        print(f"{'':>21}  localize (top {len(report.shortlist)} + {controls} controls): recall "
              f"{report.recall:.2f}, Spearman {report.spearman:.2f}")


if __name__ == "__main__":
    main()
