"""Whole-process time of `jaxpatch merge` against `mergekit-yaml` on real experts, and whether
their outputs agree.

    python scripts/bench_merge.py                     # the real experts (experiments.experts)
    python scripts/bench_merge.py --experts DIR A B   # two experts of another expert folder
    python scripts/bench_merge.py --pair DIR          # a pair's donor alone (instruct_pair)

Merges experts fine-tuned from google/gemma-3-270m into their base with each method below
(weight 1 each, float32), each in a fresh process (loading, merging and writing the
safetensors folder): jaxpatch twice (cold, with an empty compilation cache, and warm), mergekit
once; prints the times, their ratio, each process's peak memory and the largest difference
between the two merged models' tensors: against mergekit as it is, and against mergekit with
stable sorts (`scripts/mergekit_stable.py`; its own sorts leave the order among equal
magnitudes to torch, and a real task vector has many equal magnitudes at TIES' and
breadcrumbs' cuts). Merging is elementwise and memory-bound, so no FLOP rate is printed. DARE
is left out: its random drops differ by design.
Needs the `reference` extra (mergekit).
"""

from __future__ import annotations

import argparse
import json
import os
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


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """A command's whole-process wall time in seconds and its peak resident memory in GB."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit status "
                         f"{os.waitstatus_to_exitcode(status)})")
    return seconds, usage.ru_maxrss / 2**20  # kilobytes on Linux


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
    p.add_argument("--pair", help="a pair folder (base/, donor/): its donor merged alone")
    p.add_argument("names", nargs="*", default=["facts", "reverse"], help="the experts")
    args = p.parse_args()
    if args.pair:
        base, experts, label = Path(args.pair) / "base", [Path(args.pair) / "donor"], "donor"
    else:
        if args.experts:
            folder = Path(args.experts)
        else:
            from experiments.experts import default_out

            folder = default_out(0)
        base = Path(json.loads((folder / "expert_set.json").read_text())["base"])
        experts, label = [folder / n / "donor" for n in args.names], " + ".join(args.names)
    jaxpatch_cli = [sys.executable, "-c", "import sys; from jaxpatch.cli import main; "
                    "sys.exit(main())"]
    mergekit = shutil.which("mergekit-yaml")
    if mergekit is None:
        raise SystemExit("mergekit-yaml not found: pip install -e '.[reference]'")
    stable = [sys.executable, str(ROOT / "scripts" / "mergekit_stable.py")]
    print(f"{label} into the base, float32, whole process each (jaxpatch cold: an empty "
          "compilation cache; warm: the same command again):")
    print("| method | jaxpatch cold (s) | jaxpatch warm (s) | mergekit-yaml (s) | "
          "mergekit / jaxpatch warm | peak memory jaxpatch / mergekit (GB) | largest difference "
          "from mergekit | from mergekit with stable sorts |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if not base.is_dir():  # a GGUF file: both tools read the same Hugging Face folder
            import jaxpatch

            jaxpatch.save(jaxpatch.load(base), Path(tmp) / "base")
            base = Path(tmp) / "base"
        for method in METHODS:
            yml = Path(tmp) / f"{method}.yml"
            yml.write_text(config(method, base, experts))
            ours, theirs = Path(tmp) / f"{method}-jaxpatch", Path(tmp) / f"{method}-mergekit"
            cache = {"JAXPATCH_COMPILE_CACHE": str(Path(tmp) / f"xla-{method}")}
            cold, _ = timed([*jaxpatch_cli, "merge", str(yml), str(ours)], cache)
            shutil.rmtree(ours)
            warm, our_memory = timed([*jaxpatch_cli, "merge", str(yml), str(ours)], cache)
            theirs_s, their_memory = timed([mergekit, str(yml), str(theirs)])
            theirs_stable = Path(tmp) / f"{method}-mergekit-stable"
            timed([*stable, str(yml), str(theirs_stable)])
            print(f"| {method} | {cold:.1f} | {warm:.1f} | {theirs_s:.1f} | {theirs_s / warm:.2f} | "
                  f"{our_memory:.2f} / {their_memory:.2f} | "
                  f"{largest_difference(ours, theirs):.2e} | "
                  f"{largest_difference(ours, theirs_stable):.2e} |", flush=True)
            for folder in (ours, theirs, theirs_stable):
                shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
