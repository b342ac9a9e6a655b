"""Benchmark: a module sweep by jaxpatch against a plain PyTorch loop on transformers' model.

Builds a random Llama-shaped pair (6 layers, d_model 512, 8 heads, 4 kv heads, MLP 1376,
vocabulary 2048; the donor is the base plus a perturbation of every weight), 8 prompts of 128
tokens, and scores the 42 linear modules of the blocks with the vector anchor after the last
block at the last position, two ways, each in a fresh process:

- jaxpatch: `jaxpatch.sweep` (run twice: the second run is the steady state);
- reference: transformers' LlamaForCausalLM, a loop that copies one module's weights from the
  donor, runs the model, reads the anchor with a forward hook, and restores the weights.

It checks that the recoveries agree within 1e-4 and prints both throughputs, their ratio, the
whole-process times (imports, loading and compilation included) and jaxpatch's FLOP rate on the
FLOPs its sweep must do against this machine's measured float32 matmul rate.

Needs the `reference` extra. Run: python scripts/bench_sweep.py [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

SELECT = "layers.*.self_attn.*_proj | layers.*.mlp.*_proj"
SHAPE: dict[str, Any] = dict(family="llama", vocab_size=2048, d_model=512, n_layers=6, n_heads=8,
                             n_kv_heads=4, head_dim=64, d_ff=1376, max_position_embeddings=256)
PROMPTS, LENGTH = 8, 128

MAKE_PAIR = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp, numpy as np, jaxpatch
shape, folder = json.loads(sys.argv[1]), sys.argv[2]
cfg = jaxpatch.ModelConfig(**shape)
base = jaxpatch.init_params(cfg, jax.random.key(0), scale=0.05)
leaves, treedef = jax.tree_util.tree_flatten(base)
keys = jax.random.split(jax.random.key(1), len(leaves))
donor = jax.tree_util.tree_unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape)
                                               for x, k in zip(leaves, keys)])
jaxpatch.save(jaxpatch.Model(cfg, base), folder + "/base")
jaxpatch.save(jaxpatch.Model(cfg, donor), folder + "/donor")
tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (PROMPTS, LENGTH))
np.save(folder + "/tokens.npy", tokens)
""".replace("PROMPTS", str(PROMPTS)).replace("LENGTH", str(LENGTH))

JAXPATCH = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, jaxpatch
from jaxpatch.engine import sweep
from jaxpatch.metrics import VectorAnchor
from jaxpatch.prompts import Prompt, make_batch
folder, select, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
base = jaxpatch.load(folder + "/base", dtype=dtype)
donor = jaxpatch.load(folder + "/donor", dtype=dtype)
tokens = np.load(folder + "/tokens.npy")
batch = make_batch(base.config, [Prompt(tuple(map(int, row))) for row in tokens])
metric = VectorAnchor(layer=base.config.n_layers - 1)
first = sweep(base, donor, batch, metric, selector=select, progress=False)
process_s = time.perf_counter() - t0
second = sweep(base, donor, batch, metric, selector=select, progress=False)
print(json.dumps({"names": second.names, "recovery": second.recovery.tolist(),
                  "process_s": process_s, "first": first.timing, "steady": second.timing}))
"""

TORCH = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch, transformers
folder = sys.argv[1]
torch.manual_seed(0)
load = lambda name: transformers.AutoModelForCausalLM.from_pretrained(
    folder + "/" + name, dtype=torch.float32).eval()
base, donor = load("base"), load("donor")
tokens = torch.tensor(np.load(folder + "/tokens.npy"))
layer = base.config.num_hidden_layers - 1
captured = {}
def hook(module, args, output):
    captured["h"] = (output[0] if isinstance(output, tuple) else output)[:, -1].float()
def anchor_readout(model):
    handle = model.model.layers[layer].register_forward_hook(hook)
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return captured["h"]
h_base, h_donor = anchor_readout(base), anchor_readout(donor)
v = (h_donor - h_base).mean(0)
v = v / v.norm()
score = lambda h: float((h @ v).mean())
base_score, donor_score = score(h_base), score(h_donor)
modules = [f"layers.{i}.{m}" for i in range(base.config.num_hidden_layers)
           for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
handle = base.model.layers[layer].register_forward_hook(hook)
def patched_score(name):
    target, source = base.model.get_submodule(name), donor.model.get_submodule(name)
    saved = target.weight.detach().clone()
    with torch.no_grad():
        target.weight.copy_(source.weight)
        base(tokens)
        target.weight.copy_(saved)
    return score(captured["h"])
patched_score(modules[0])  # warm-up
start = time.perf_counter()
scores = [patched_score(name) for name in modules]
loop_s = time.perf_counter() - start
recovery = [(s - base_score) / (donor_score - base_score) for s in scores]
print(json.dumps({"names": modules, "recovery": recovery, "loop_s": loop_s,
                  "process_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}))
"""

MATMUL = r"""
import json, time, sys, jax, jax.numpy as jnp
n, dtype = 2048, sys.argv[1]
a = jax.random.normal(jax.random.key(0), (n, n), dtype)
b = jax.random.normal(jax.random.key(1), (n, n), dtype)
f = jax.jit(lambda a, b: a @ b)
f(a, b).block_until_ready()
best = float("inf")
for _ in range(5):
    start = time.perf_counter()
    for _ in range(4):
        out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / 4)
print(json.dumps({"flops_per_s": 2 * n**3 / best}))
"""


def run(code: str, *args: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    result["wall_s"] = time.perf_counter() - start
    return result


def forward_flops(shape: dict, n_prompts: int, length: int, first_block: int = 0) -> float:
    """FLOPs of a forward pass from block `first_block` to the anchor after the last block:
    the blocks before the last on every token, the last block's keys and values on every token
    and the rest at the readout position (matmuls and attention; norms and activations omitted)."""
    d, h, kv, hd, ff, layers = (shape[k] for k in ("d_model", "n_heads", "n_kv_heads", "head_dim",
                                                   "d_ff", "n_layers"))
    tokens = n_prompts * length
    q_o = 2 * d * h * hd
    k_v = 2 * d * kv * hd
    mlp = 3 * d * ff
    attention = 2 * h * hd * length  # scores and weighted values per query token (causal: half)
    block = 2 * tokens * (q_o + k_v + mlp) + 2 * tokens * attention / 2 * 2
    last_block = 2 * tokens * k_v + 2 * n_prompts * (q_o + mlp) + 2 * n_prompts * attention * 2
    return (layers - 1 - first_block) * block + last_block


def sweep_flops(shape: dict, n_prompts: int, length: int, n_candidates_per_layer: int) -> float:
    """FLOPs the sweep must do: a candidate in block i runs the forward pass from block i."""
    return sum(n_candidates_per_layer * forward_flops(shape, n_prompts, length, i)
               for i in range(shape["n_layers"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run(MAKE_PAIR, json.dumps(SHAPE), folder)
        ours = run(JAXPATCH, folder, SELECT, args.dtype)
        theirs = run(TORCH, folder)
        matmul = run(MATMUL, args.dtype)
    assert ours["names"] == theirs["names"], "candidate orders differ"
    gap = max(abs(a - b) for a, b in zip(ours["recovery"], theirs["recovery"]))
    n = len(ours["names"])
    ours_rate = ours["steady"]["candidates_per_s"]
    theirs_rate = n / theirs["loop_s"]
    flops = sweep_flops(SHAPE, PROMPTS, LENGTH, n // SHAPE["n_layers"])
    flop_rate = flops / ours["steady"]["sweep_s"]
    print(f"pair: {SHAPE['n_layers']} layers, d_model {SHAPE['d_model']}, {PROMPTS} x {LENGTH} tokens, "
          f"{n} module candidates, anchor after block {SHAPE['n_layers'] - 1}, {args.dtype}")
    print(f"agreement: max |recovery difference| = {gap:.2e} ({'ok' if gap < 1e-4 else 'FAILED'})")
    print(f"steady state: jaxpatch {ours_rate:.2f} candidates/s, PyTorch loop {theirs_rate:.2f} "
          f"candidates/s ({theirs['threads']} threads): ratio {ours_rate / theirs_rate:.2f}x")
    print(f"whole process: jaxpatch {ours['process_s']:.1f} s (compile {ours['first']['compile_s']:.1f} s), "
          f"PyTorch {theirs['process_s']:.1f} s: ratio {theirs['process_s'] / ours['process_s']:.2f}x")
    print(f"FLOP rate: {flop_rate / 1e9:.1f} GFLOP/s on {flops / 1e12:.2f} TFLOP the sweep must do; "
          f"measured {args.dtype} matmul rate {matmul['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"({100 * flop_rate / matmul['flops_per_s']:.0f}%)")
    if gap >= 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
