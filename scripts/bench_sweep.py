"""Benchmark: a module sweep by jaxpatch against a plain PyTorch loop on transformers' model.

Builds a random pair of a preset shape (the donor is the base plus a perturbation of every
weight) and scores the linear modules of the blocks with the vector anchor after the last block
at the last position, two ways, each in fresh processes on the same device (the accelerator JAX
sees, and CUDA for torch when it has it):

- jaxpatch: `jaxpatch.sweep`, run twice per process (the second run is the steady state), in
  two processes against one new compilation-cache folder: the first compiles everything (cold
  cache), the second reads its programs back (warm cache);
- reference: transformers' model in a loop that copies one module's weights from the donor,
  runs the model, reads the anchor with a forward hook, and restores the weights.

Presets:
  default       Llama-shaped: 6 layers, d_model 512, 8 heads, 4 kv heads, MLP 1376, vocabulary
                2048; 8 prompts x 128 tokens; 42 candidates; float32 (the CPU benchmark)
  qwen2.5-0.5b  Qwen2.5-0.5B-shaped: 24 layers, d_model 896, 14 heads, 2 kv heads, MLP 4864,
                vocabulary 151936, tied embeddings; 32 prompts x 128 tokens; 168 candidates;
                bfloat16 (the GPU benchmark; far too slow for a CPU)

It checks that the recoveries agree (1e-4 in float32, 2e-2 in bfloat16) and prints both
throughputs and their ratio, the whole-process times (imports, loading, preparation and
compilation included; cold and warm cache) and their ratios, jaxpatch's preparation and
compilation seconds, its peak memory against the two models' params, and its FLOP rate on the
FLOPs its sweep must do against a matmul measured in the same run (the MFU).

Needs the `reference` extra. Run: python scripts/bench_sweep.py [--preset NAME] [--dtype D]
[--layers N] (N: fewer blocks, to try a preset's code path on a small machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

SELECT = "layers.*.self_attn.*_proj | layers.*.mlp.*_proj"
SHAPE: dict[str, Any] = dict(family="llama", vocab_size=2048, d_model=512, n_layers=6, n_heads=8,
                             n_kv_heads=4, head_dim=64, d_ff=1376, max_position_embeddings=256)
PROMPTS, LENGTH = 8, 128
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"shape": SHAPE, "prompts": PROMPTS, "length": LENGTH, "dtype": "float32"},
    "qwen2.5-0.5b": {"shape": dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24,
                                   n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864,
                                   max_position_embeddings=32768, rope_theta=1e6, norm_eps=1e-6,
                                   qkv_bias=True, tie_embeddings=True),
                     "prompts": 32, "length": 128, "dtype": "bfloat16"},
}

MAKE_PAIR = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp, numpy as np, jaxpatch
shape, folder, prompts, length = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = jaxpatch.ModelConfig(**shape)
base = jaxpatch.init_params(cfg, jax.random.key(0), scale=0.05)
leaves, treedef = jax.tree_util.tree_flatten(base)
keys = jax.random.split(jax.random.key(1), len(leaves))
donor = jax.tree_util.tree_unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape)
                                               for x, k in zip(leaves, keys)])
jaxpatch.save(jaxpatch.Model(cfg, base), folder + "/base")
jaxpatch.save(jaxpatch.Model(cfg, donor), folder + "/donor")
tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (prompts, length))
np.save(folder + "/tokens.npy", tokens)
"""

JAXPATCH = r"""
import json, resource, sys, threading, time
t0 = time.perf_counter()
import jax, numpy as np, jaxpatch
from jaxpatch.engine import sweep
from jaxpatch.metrics import VectorAnchor
from jaxpatch.prompts import Prompt, make_batch
folder, select, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
import_s = time.perf_counter() - t0
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = jaxpatch.load(folder + "/base", dtype=dtype)
donor = jaxpatch.load(folder + "/donor", dtype=dtype)
load_s = time.perf_counter() - t0 - import_s
tokens = np.load(folder + "/tokens.npy")
batch = make_batch(base.config, [Prompt(tuple(map(int, row))) for row in tokens])
metric = VectorAnchor(layer=base.config.n_layers - 1)
live = [0]  # the most bytes held by live JAX arrays while the first sweep runs, sampled
running = threading.Event()
def sample():
    while not running.is_set():
        live[0] = max(live[0], sum(x.nbytes for x in jax.live_arrays()))
        time.sleep(0.005)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
quiet = jaxpatch.Execution(progress=False)
# A fresh prepared pair per sweep: each run's time includes its prefix passes, as the loop's does
first = sweep(jaxpatch.prepare(base, donor, batch), metric, selector=select, execution=quiet)
running.set()
sampler.join()
process_s = time.perf_counter() - t0
second = sweep(jaxpatch.prepare(base, donor, batch), metric, selector=select, execution=quiet)
device = jax.devices()[0]
stats = device.memory_stats() if device.platform != "cpu" else None
peak = (stats["peak_bytes_in_use"] if stats else
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
params = sum(x.nbytes for m in (base, donor) for x in jax.tree_util.tree_leaves(m.params))
print(json.dumps({"names": second.names, "recovery": second.recovery.tolist(),
                  "process_s": process_s, "import_s": import_s, "load_s": load_s,
                  "first": first.timing, "steady": second.timing, "peak_bytes": peak,
                  "params_bytes": params, "live_bytes": live[0], "device": device.device_kind,
                  "peak_is": "device peak" if stats else "resident memory added after imports"}))
"""

TORCH = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch, transformers
folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
load = lambda name: transformers.AutoModelForCausalLM.from_pretrained(
    folder + "/" + name, dtype=dtype).eval().to(device)
base, donor = load("base"), load("donor")
tokens = torch.tensor(np.load(folder + "/tokens.npy")).to(device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
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
sync()
start = time.perf_counter()
scores = [patched_score(name) for name in modules]
sync()
loop_s = time.perf_counter() - start
recovery = [(s - base_score) / (donor_score - base_score) for s in scores]
print(json.dumps({"names": modules, "recovery": recovery, "loop_s": loop_s,
                  "process_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                  "device": device}))
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


def run(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                         text=True, env=None if env is None else {**os.environ, **env})
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
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="default: the preset's (float32 for default, bfloat16 for qwen2.5-0.5b)")
    parser.add_argument("--layers", type=int, help="fewer blocks than the preset (a smoke run)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    shape = {**preset["shape"], **({"n_layers": args.layers} if args.layers else {})}
    prompts, length, dtype = preset["prompts"], preset["length"], args.dtype or preset["dtype"]
    with tempfile.TemporaryDirectory() as folder:
        run(MAKE_PAIR, json.dumps(shape), folder, str(prompts), str(length))
        cache = {"JAXPATCH_COMPILE_CACHE": folder + "/xla"}
        cold = run(JAXPATCH, folder, SELECT, dtype, env=cache)
        warm = run(JAXPATCH, folder, SELECT, dtype, env=cache)
        theirs = run(TORCH, folder, dtype)
        matmul = run(MATMUL, dtype)
    assert cold["names"] == theirs["names"], "candidate orders differ"
    gap = max(abs(a - b) for a, b in zip(warm["recovery"], theirs["recovery"]))
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    n = len(warm["names"])
    ours_rate = max(cold["steady"]["candidates_per_s"], warm["steady"]["candidates_per_s"])
    theirs_rate = n / theirs["loop_s"]
    flops = sweep_flops(shape, prompts, length, n // shape["n_layers"])
    flop_rate = flops / min(cold["steady"]["sweep_s"], warm["steady"]["sweep_s"])
    print(f"pair: {args.preset}, {shape['n_layers']} layers, d_model {shape['d_model']}, "
          f"{prompts} x {length} tokens, {n} module candidates, anchor after block "
          f"{shape['n_layers'] - 1}, {dtype}; jaxpatch on {cold['device']}, torch on "
          f"{theirs['device']} ({theirs['threads']} threads)")
    print(f"agreement: max |recovery difference| = {gap:.2e} "
          f"({'ok' if gap < tolerance else 'FAILED'}, tolerance {tolerance:g})")
    print(f"steady state: jaxpatch {ours_rate:.2f} candidates/s, PyTorch loop {theirs_rate:.2f} "
          f"candidates/s: ratio {ours_rate / theirs_rate:.2f}x")
    for name, ours in (("cold cache", cold), ("warm cache", warm)):
        first = ours["first"]
        print(f"whole process, {name}: jaxpatch {ours['process_s']:.1f} s (imports "
              f"{ours['import_s']:.1f} s, loading {ours['load_s']:.1f} s, preparation "
              f"{first['prepare_s']:.1f} s, compilation {first['compile_s']:.1f} s, sweep "
              f"{first['sweep_s']:.1f} s), PyTorch {theirs['process_s']:.1f} s: ratio "
              f"{theirs['process_s'] / ours['process_s']:.2f}x")
    params = warm["params_bytes"]
    extra = (warm["live_bytes"] - params) / (params / 2)
    print(f"memory: params of both models {params / 2**20:.0f} MiB; live arrays during the sweep "
          f"at most {warm['live_bytes'] / 2**20:.0f} MiB ({extra:.2f} model copies more; target "
          f"<= 1); peak {warm['peak_bytes'] / 2**20:.0f} MiB ({warm['peak_is']})")
    print(f"FLOP rate: {flop_rate / 1e9:.1f} GFLOP/s on {flops / 1e12:.2f} TFLOP the sweep must do; "
          f"measured {dtype} matmul rate {matmul['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"(MFU {100 * flop_rate / matmul['flops_per_s']:.0f}%)")
    if gap >= tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
