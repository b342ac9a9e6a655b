"""Benchmark: many patched models generating at once, against one at a time.

A random Llama-shaped pair (4 layers, d_model 256, 8 heads, 4 kv heads, MLP 688, vocabulary
2048), 8 prompts of 24 tokens, 32 new tokens each, 28 candidate patches (the linear modules of
the blocks, one each). Measured in one run, warm (every program compiled first), best of 3:

- batched: `generate_under_patches` with chunks of 16 and 32 candidates (vmapped);
- one at a time: each candidate patched alone (`jaxpatch.apply`), then `greedy_generate` with
  the cache (one compiled program, 28 calls);
- the same for the 32 attention heads (one candidate per head, chunks of 32, against each head
  patched alone and then generating);
- the reference without a cache: patching each candidate and rerunning the whole sequence
  every step (`prompts.greedy_continuations`), for 4 candidates.

Prints seconds per candidate and the ratios; the tokens of every method are checked equal.

    python scripts/bench_generation.py
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxpatch  # noqa: E402
from jaxpatch import Execution, Patch, prepare  # noqa: E402
from jaxpatch.engine.generation import generate_under_patches, greedy_generate  # noqa: E402
from jaxpatch.examples import random_pair  # noqa: E402
from jaxpatch.prompts import (  # noqa: E402
    Prompt,
    greedy_continuations,
    make_batch,
    prompt_buffer,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attribution import best_of  # noqa: E402  (a sibling script)


def main() -> int:
    base, donor = random_pair("llama", n_layers=4, d_model=256, n_heads=8, n_kv_heads=4,
                              head_dim=32, d_ff=688, vocab_size=2048, max_position_embeddings=128,
                              perturbation=0.05, scale=0.05)
    config = base.config
    rng = np.random.default_rng(0)
    prompts = [Prompt(tuple(int(t) for t in rng.integers(1, 2048, 24))) for _ in range(8)]
    pair = prepare(base, donor, make_batch(config, prompts))
    modules = [c for c in jaxpatch.select(config, "layers.*", "module") if "norm" not in c.name]
    patches = {c.name: Patch.from_components(config, [c]) for c in modules}
    n_tokens = 32
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; {len(patches)} candidates, "
          f"{len(prompts)} prompts of 24 tokens, {n_tokens} new tokens")
    results, per_candidate = {}, {}
    for chunk in (32, 16, 8):
        run = lambda c=chunk: generate_under_patches(pair, patches, prompts, n_tokens,
                                                     execution=Execution(chunk_size=c))
        seconds = best_of(run, repeats=3)
        results[chunk] = run()
        per_candidate[chunk] = seconds / len(patches)
        print(f"chunks of {chunk:2d}: {seconds:.2f} s, {per_candidate[chunk] * 1e3:.1f} ms per "
              "candidate")
    tokens, lengths = prompt_buffer(config, prompts, n_tokens)

    def one_at_a_time():
        return {n: np.asarray(greedy_generate(config, jaxpatch.apply(p, base.params, donor.params),
                                              tokens, lengths, n_tokens))
                for n, p in patches.items()}

    single = best_of(one_at_a_time, repeats=3) / len(patches)
    alone = one_at_a_time()
    print(f"one at a time (patch, then generate with the cache): {single * 1e3:.1f} ms per candidate")
    batched = min(per_candidate.values())
    heads = {c.name: Patch.from_components(config, [c])
             for c in jaxpatch.select(config, "layers.*.self_attn", "head")}
    head_batched = best_of(lambda: generate_under_patches(pair, heads, prompts, n_tokens,
                                                          execution=Execution(chunk_size=32)),
                           repeats=3) / len(heads)

    def heads_alone():
        return {n: np.asarray(greedy_generate(config, jaxpatch.apply(p, base.params, donor.params),
                                              tokens, lengths, n_tokens))
                for n, p in heads.items()}

    head_single = best_of(heads_alone, repeats=1) / len(heads)
    print(f"{len(heads)} head candidates: batched {head_batched * 1e3:.1f} ms, one at a time "
          f"{head_single * 1e3:.1f} ms per candidate ({head_single / head_batched:.1f}x)")
    few = dict(list(patches.items())[:4])

    def uncached():
        return {n: greedy_continuations(config, jaxpatch.apply(p, base.params, donor.params),
                                        prompts, n_tokens) for n, p in few.items()}

    reference_s = best_of(uncached, repeats=1) / len(few)
    reference = uncached()
    assert all(results[32][n].tolist() == reference[n] for n in few)
    assert all(np.array_equal(results[c][n], alone[n]) for c in results for n in patches)
    print(f"no cache, one at a time: {reference_s * 1e3:.1f} ms per candidate")
    matmul = jax.jit(lambda a, b: a @ b)
    square = jax.numpy.ones((2048, 2048), jax.numpy.float32)
    matmul_s = best_of(lambda: matmul(square, square).block_until_ready(), repeats=5)
    weights = sum(x.size for x in jax.tree_util.tree_leaves(base.params["layers"]))
    weights += config.vocab_size * config.d_model  # the unembedding
    flops = 2 * weights * len(prompts) * (24 + n_tokens)  # matmuls only, per candidate
    print(f"FLOP rate: one at a time {flops / single / 1e9:.0f} GFLOP/s, batched "
          f"{flops / batched / 1e9:.0f} GFLOP/s; the machine's float32 matmul "
          f"{2 * 2048**3 / matmul_s / 1e9:.0f} GFLOP/s")
    print(f"per candidate: batched (best chunk) {single / batched:.1f}x faster than one at a time with "
          f"the cache, {reference_s / batched:.1f}x faster than one at a time without it; tokens "
          "equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
