"""Generates the merge fixtures in tests/fixtures/merge from mergekit itself.

Builds tiny random checkpoints (a base and three experts fine-tuned from it, for a Llama-style
and a GPT-2 model: GPT-2 stores q, k and v fused in one tensor, where the methods that pick
elements by magnitude see them together; and `llama-ties`, whose experts move by multiples of
1/64, so that TIES' and Model Breadcrumbs' cuts fall among equal magnitudes), writes one
mergekit YAML per case, runs mergekit on each (with stable sorts, `scripts/mergekit_stable.py`:
mergekit's own order among equal magnitudes is torch's unspecified one), and keeps the merged
tensors as `<case>.safetensors`. The default test suite merges the same YAML files with
jaxpatch and compares, so it needs no mergekit.

Needs the `reference` extra (mergekit, torch, transformers):  pip install -e ".[reference]"
Run:                                           python scripts/make_merge_fixtures.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxpatch  # noqa: E402
from jaxpatch.models.config import ModelConfig, init_params  # noqa: E402

MODELS = {
    "llama": ModelConfig.tiny("llama", vocab_size=32, d_model=8, d_ff=16, n_heads=2,
                              n_kv_heads=1, head_dim=4, n_layers=3, max_position_embeddings=16),
    "gpt2": ModelConfig.tiny("gpt2", vocab_size=32, d_model=8, d_ff=16, n_heads=2, n_kv_heads=2,
                             head_dim=4, n_layers=2, max_position_embeddings=16),
}

CASES: dict[str, str] = {
    "linear": """merge_method: linear
models:
  - model: expert1
    parameters: {weight: 0.3}
  - model: expert2
    parameters: {weight: [1.0, 0.2]}
  - model: base
    parameters: {weight: 0.5}
dtype: float32
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: base
models:
  - model: expert1
    parameters: {weight: 0.7}
  - model: expert2
    parameters:
      weight: [{filter: mlp, value: 0.1}, {value: 0.9}]
parameters: {lambda: 1.3, normalize: true}
dtype: float32
""",
    "ties": """merge_method: ties
base_model: base
models:
  - model: base
  - model: expert1
    parameters: {weight: 0.6, density: 0.5}
  - model: expert2
    parameters: {weight: [0.2, 0.8], density: 0.7}
  - model: expert3
    parameters: {weight: 0.4, density: [{filter: self_attn, value: 0.3}, {value: 0.9}]}
parameters: {lambda: 0.9}
dtype: float32
""",
    "ties_unnormalized": """merge_method: ties
base_model: base
models:
  - model: expert1
    parameters: {weight: 1.0, density: 0.2}
  - model: expert2
    parameters: {weight: 1.0, density: 0.2}
parameters: {normalize: false, int8_mask: true}
dtype: float32
""",
    "slerp": """merge_method: slerp
base_model: base
models:
  - model: base
  - model: expert1
parameters:
  t: [0.0, 0.3, 0.9]
dtype: float32
""",
    "dare_linear": """merge_method: dare_linear
base_model: base
models:
  - model: expert1
    parameters: {weight: 1.0, density: 0.4}
dtype: float32
""",
    "dare_ties_dense": """merge_method: dare_ties
base_model: base
models:
  - model: expert1
    parameters: {weight: 0.5, density: 1.0}
  - model: expert2
    parameters: {weight: 0.5, density: 1.0}
dtype: float32
""",
    "breadcrumbs": """merge_method: breadcrumbs
base_model: base
models:
  - model: expert1
    parameters: {weight: 0.7, density: 0.6, gamma: 0.1}
  - model: expert2
    parameters: {weight: 0.5, density: [0.3, 0.9], gamma: 0.02}
  - model: expert3
    parameters: {weight: 0.4, density: 0.95, gamma: 0.2}
parameters: {lambda: 1.2}
dtype: float32
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: base
models:
  - model: expert1
    parameters: {weight: 1.0, density: 0.5, gamma: 0.05}
  - model: expert2
    parameters: {weight: 0.8, density: 0.7}
  - model: expert3
    parameters: {weight: 0.6, density: 0.4, gamma: 0.1}
parameters: {normalize: true}
dtype: float32
""",
    "model_stock": """merge_method: model_stock
base_model: base
models:
  - model: expert1
  - model: expert2
  - model: expert3
dtype: float32
""",
    "model_stock_filter_wise": """merge_method: model_stock
base_model: base
models:
  - model: expert1
  - model: expert2
parameters: {filter_wise: true}
dtype: float32
""",
}
# The cases whose result depends on which of equal magnitudes a cut keeps.
TIED_CASES = ("ties", "ties_unnormalized", "breadcrumbs", "breadcrumbs_ties")
FAMILIES: dict[str, tuple[ModelConfig, bool, tuple[str, ...]]] = {
    "llama": (MODELS["llama"], False, tuple(CASES)),
    "gpt2": (MODELS["gpt2"], False, tuple(CASES)),
    "llama-ties": (MODELS["llama"], True, TIED_CASES),
}


def build_models(config: ModelConfig, out: Path, tied: bool = False) -> None:
    """A base with random weights and three experts: the base plus small independent noise
    (`tied`: the base on a grid of 1/1024 and the noise in multiples of 1/64, so every sum
    and difference is exact and many deltas have equal magnitudes)."""
    base = init_params(config, jax.random.key(0), scale=0.2)
    if tied:
        base = jax.tree_util.tree_map(lambda x: jnp.round(x * 1024) / 1024, base)
    jaxpatch.save(jaxpatch.Model(config, base), out / "base")
    leaves, treedef = jax.tree_util.tree_flatten(base)
    for i in (1, 2, 3):
        keys = jax.random.split(jax.random.key(10 + i), len(leaves))
        noise = [0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        if tied:
            noise = [jnp.round(n * 64) / 64 for n in noise]
        expert = [x + n for x, n in zip(leaves, noise)]
        jaxpatch.save(jaxpatch.Model(config, jax.tree_util.tree_unflatten(treedef, expert)),
                      out / f"expert{i}")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "merge"))
    p.add_argument("--seed", type=int, default=0, help="mergekit's --random-seed (DARE)")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local folders only
    for family, (config, tied, cases) in FAMILIES.items():
        folder = out / family
        build_models(config, folder, tied)
        for case in cases:
            (folder / f"{case}.yml").write_text(CASES[case])
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, str(ROOT / "scripts" / "mergekit_stable.py"),
                                str(folder / f"{case}.yml"), tmp + "/merged",
                                "--allow-crimes", "--no-write-model-card", "--no-copy-tokenizer",
                                "--random-seed", str(args.seed)],
                               check=True, env=env, cwd=folder, capture_output=True)
                shutil.copy(Path(tmp) / "merged" / "model.safetensors",
                            folder / f"{case}.safetensors")
            print(f"{family}/{case}: merged by mergekit")
    from importlib.metadata import version

    versions = {name: version(name) for name in ("mergekit", "torch", "transformers")}
    (out / "VERSIONS.json").write_text(json.dumps({**versions, "seed": args.seed,
                                                   "sorts": "stable"}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
