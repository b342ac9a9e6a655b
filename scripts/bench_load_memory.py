"""Peak memory of `jaxpatch.load` against the size of the params it loads.

Writes a random Llama-shaped checkpoint of a few hundred MB, then, each in a fresh process,
measures the peak resident memory added by:
  - jaxpatch.load (safetensors read one tensor at a time into the final layout), and
  - a reference: the safetensors library's load_file into numpy, then jax arrays of the same
    (Hugging Face) layout, without any conversion.
Peak is the kernel's high-water mark (VmHWM) after resetting it once jax is initialized.

Run: python scripts/bench_load_memory.py [--layers 8] [--d-model 768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, sys, time
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
import numpy as np
mode, folder = sys.argv[1], sys.argv[2]
if mode == "jaxpatch":
    import jaxpatch
else:
    import safetensors.numpy
Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
start = time.perf_counter()
if mode == "jaxpatch":
    tree = jaxpatch.load(folder).params
else:
    tree = {k: jnp.asarray(v) for k, v in safetensors.numpy.load_file(folder + "/model.safetensors").items()}
jax.block_until_ready(tree)
seconds = time.perf_counter() - start
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
print(json.dumps({"peak_added": status("VmHWM") - base, "params_bytes": nbytes, "seconds": seconds}))
"""

WRITE = r"""
import sys, jax, jaxpatch
layers, d = int(sys.argv[2]), int(sys.argv[3])
cfg = jaxpatch.ModelConfig(family="llama", vocab_size=32000, d_model=d, n_layers=layers,
                           n_heads=d // 64, n_kv_heads=d // 128, head_dim=64, d_ff=int(d * 8 / 3),
                           max_position_embeddings=2048)
jaxpatch.save(jaxpatch.Model(cfg, jaxpatch.init_params(cfg, jax.random.key(0))), sys.argv[1])
"""


def run(code: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=768)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "ckpt")
        run(WRITE, folder, str(args.layers), str(args.d_model))
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
        print(f"checkpoint: {size / 2**20:.0f} MiB on disk")
        for mode in ("jaxpatch", "safetensors.numpy"):
            r = json.loads(run(MEASURE, mode, folder).strip().splitlines()[-1])
            print(f"{mode:>18}: params {r['params_bytes'] / 2**20:7.0f} MiB, peak added "
                  f"{r['peak_added'] / 2**20:7.0f} MiB, ratio {r['peak_added'] / r['params_bytes']:.2f}, "
                  f"{r['seconds']:.2f} s")


if __name__ == "__main__":
    main()
