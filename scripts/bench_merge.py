"""Whole-process time of `jaxpatch merge` against `mergekit-yaml` on real experts, and whether
their outputs agree.

    python scripts/bench_merge.py                     # the real experts (experiments.experts)
    python scripts/bench_merge.py --experts DIR A B   # two experts of another expert folder

Merges two experts fine-tuned from google/gemma-3-270m into their base with each method below
(weight 1 each, float32), once with each tool, each in a fresh process (loading, merging and
writing the safetensors folder), and prints the times, their ratio and the largest difference
between the two merged models' tensors. DARE is left out: its random drops differ by design.
Needs the `reference` extra (mergekit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = {"task_arithmetic": "", "ties": "density: 0.5", "breadcrumbs": "density: 0.8"}


def config(method: str, base: Path, experts: list[Path]) -> str:
    """A mergekit YAML merging `experts` into `base` with `method` (weight 1 each)."""
    extra = METHODS[method]
    models = "".join(f"  - model: {e}\n    parameters: {{weight: 1.0{', ' + extra if extra else ''}}}\n"
                     for e in experts)
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}dtype: float32\n"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def largest_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two folders' tensors of the same name."""
    from safetensors.numpy import load_file

    def tensors(folder: Path) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = tensors(a), tensors(b)
    shared = set(x) & set(y)
    if not shared:
        raise SystemExit(f"{a} and {b} share no tensor names")
    return max(float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64))))
               for k in shared)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--experts", help="an expert folder (default: experiments.experts' seed 0)")
    p.add_argument("names", nargs="*", default=["facts", "reverse"], help="two experts")
    args = p.parse_args()
    if args.experts:
        folder = Path(args.experts)
    else:
        from experiments.experts import default_out

        folder = default_out(0)
    base = Path(json.loads((folder / "expert_set.json").read_text())["base"])
    experts = [folder / n / "donor" for n in args.names]
    jaxpatch_cli = [sys.executable, "-c", "import sys; from jaxpatch.cli import main; "
                    "sys.exit(main())"]
    mergekit = shutil.which("mergekit-yaml")
    if mergekit is None:
        raise SystemExit("mergekit-yaml not found: pip install -e '.[reference]'")
    print(f"{' + '.join(args.names)} into their base, float32, whole process each:")
    print("| method | jaxpatch merge (s) | mergekit-yaml (s) | mergekit / jaxpatch | largest difference |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if not base.is_dir():  # a GGUF file: both tools read the same Hugging Face folder
            import jaxpatch

            jaxpatch.save(jaxpatch.load(base), Path(tmp) / "base")
            base = Path(tmp) / "base"
        for method in METHODS:
            yml = Path(tmp) / f"{method}.yml"
            yml.write_text(config(method, base, experts))
            ours, theirs = Path(tmp) / f"{method}-jaxpatch", Path(tmp) / f"{method}-mergekit"
            t_ours = timed([*jaxpatch_cli, "merge", str(yml), str(ours)])
            t_theirs = timed([mergekit, str(yml), str(theirs)])
            print(f"| {method} | {t_ours:.1f} | {t_theirs:.1f} | {t_theirs / t_ours:.2f} | "
                  f"{largest_difference(ours, theirs):.2e} |", flush=True)
            shutil.rmtree(ours)
            shutil.rmtree(theirs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
