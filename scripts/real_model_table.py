"""The real-model results: google/gemma-3-270m loaded from its GGUF file, checked against
transformers, taught counterfactual facts in a planted set S, and localized by every method.

1. **Parity.** jaxpatch's logits from the Q4_K_M GGUF against transformers' own GGUF load
   (recorded in tests/fixtures/gemma3-270m.npz by scripts/make_gguf_fixtures.py): largest error
   relative to the logits' scale on 8 real prompts, top-5 agreement, and tokenizer agreement on
   17 texts. Load time of the file.
2. **The pair.** Builds it (`experiments.planted_real`) into `--pair` unless it is there.
3. **The demo's evaluation on it** (`jaxpatch.studies.evaluate.evaluate`, what `jaxpatch demo --pair`
   runs): module and head granularity exhaustively, neurons narrowed with integrated gradients
   and the shortlist verified exactly (36,864 neurons: one exact run each is too slow on a CPU).

Writes docs/real_model.json and docs/real_model.md (the targets of the real-model issue, each
with its measurement), printing the table.

    python scripts/real_model_table.py --pair ~/.cache/jaxpatch/pairs/gemma3-270m-facts-seed0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

import jaxpatch  # noqa: E402
from experiments import planted_real  # noqa: E402
from experiments.real_model import gemma3_270m_path  # noqa: E402
from jaxpatch.studies.evaluate import evaluate, load_planted  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
# What the table measures: the targets and the baselines beside them. S is MLP neurons,
# so no head is in it; the learned patch, activation patching and the hierarchy (the full demo,
# `jaxpatch demo --pair`) take about an hour more on 2 CPU cores.
GRANULARITIES = ("module", "neuron")
STAGES = ("narrow-then-verify", "exact-denoise", "exact-noise", "first-order",
          "integrated-gradients", "delta-norm", "random")


def machine() -> str:
    """The machine the figures come from, in words."""
    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else (platform.processor() or platform.machine())
    return f"{device.platform.upper()} ({kind}), {os.cpu_count()} CPU cores, jax {jax.__version__}"


def parity() -> dict[str, Any]:
    """The GGUF load against transformers' recorded outputs."""
    start = time.perf_counter()
    model = jaxpatch.load(gemma3_270m_path())
    load_seconds = time.perf_counter() - start
    with np.load(FIXTURES / "gemma3-270m.npz") as data:
        ref = dict(data)
    errors, agree = [], []
    for row, length in enumerate(ref["prompt_lengths"]):
        logits = np.asarray(model([ref["prompt_ids"][row, :length].tolist()]))[0, -1]
        scale = np.abs(ref["top64_logits"][row]).max()
        errors.append(max(np.abs(logits[ref["top64"][row]] - ref["top64_logits"][row]).max(),
                          np.abs(logits[ref["probe"]] - ref["probe_logits"][row]).max()) / scale)
        agree.append(np.argsort(-logits)[:5].tolist() == ref["top5"][row].tolist())
    texts = json.loads((FIXTURES / "gemma3-270m-texts.json").read_text())
    same = [model.tokenizer.encode(t).ids == ids for t, ids in zip(texts["texts"], texts["ids"])]
    return {"load_seconds": round(load_seconds, 1), "prompts": len(errors),
            "max_relative_error": float(max(errors)), "top5_agree": int(sum(agree)),
            "texts": len(same), "tokenizer_agree": int(sum(same))}


def run(pair_dir: Path) -> dict[str, Any]:
    """Builds the pair if needed, then evaluates it as the demo does."""
    out: dict[str, Any] = {"machine": machine(), "parity": parity()}
    if not (pair_dir / "planted.json").is_file():
        start = time.perf_counter()
        planted_real.write(planted_real.build(planted_real.Settings()), pair_dir, overwrite=True)
        out["build_seconds"] = round(time.perf_counter() - start, 1)
    pair = load_planted(pair_dir)
    record = pair.record
    out["pair"] = {k: record.get(k) for k in ("settings", "accuracy", "held_out_text_loss", "seconds")}
    out["pair"]["movement"] = {g: m["summary"] for g, m in record["movement"].items()}
    start = time.perf_counter()
    ev = evaluate(pair, granularities=GRANULARITIES, stages=STAGES,
                  stage=lambda name, total: print(f"  {name}", flush=True) and None)
    out["evaluate_seconds"] = round(time.perf_counter() - start, 1)
    summary = ev.summary
    out["behavior"] = summary["behavior"]
    out["auc"] = {g: summary["granularities"][g]["auc"] for g in summary["granularities"]}
    out["planted"] = {g: [sum(d["planted"]), len(d["names"])] for g, d in summary["granularities"].items()}
    v = summary["narrow_then_verify"]
    out["narrow_then_verify"] = {k: v[k] for k in ("granularity", "method", "recall_k", "top_k", "controls",
                                                   "verified_fraction", "spearman", "recall", "reference")}
    out["hierarchy"] = (summary.get("hierarchy") or {}).get("planted")
    out["timing"] = summary["timing"]
    return out


def markdown(r: dict[str, Any]) -> str:
    """The document."""
    p, pair, auc, v = r["parity"], r["pair"], r["auc"], r["narrow_then_verify"]
    fmt = lambda x: "-" if x is None else "n/a" if x != x else f"{x:.3f}"  # x != x: NaN, no S there
    module_ok = min(auc["module"]["exact-denoise"], auc["module"]["exact-noise"]) >= 0.95
    recall_ok = v["recall"] >= 0.9 and v["verified_fraction"] <= 0.1
    acc, text = pair["accuracy"], pair["held_out_text_loss"]
    lines = [
        "# A real pretrained model: google/gemma-3-270m",
        "",
        f"Generated by `python scripts/real_model_table.py` on {r['machine']}. No GPU was available for",
        "these figures.",
        "",
        "## Parity with transformers",
        "",
        f"The Q4_K_M GGUF file (dequantized to float32 by jaxpatch's own reader, {p['load_seconds']} s "
        "to load) against transformers' own GGUF load (float32, eager attention), recorded by "
        "`scripts/make_gguf_fixtures.py`:",
        "",
        "| check | target | measured |",
        "| --- | --- | --- |",
        f"| next-token logits, largest error / logit scale ({p['prompts']} real prompts) | <= 1e-3 | "
        f"{p['max_relative_error']:.1e} |",
        f"| same top-5 next tokens | all | {p['top5_agree']}/{p['prompts']} |",
        f"| same token ids as transformers' tokenizer for the file | all | "
        f"{p['tokenizer_agree']}/{p['texts']} texts |",
        "| logits on random Gemma 3 configs (tests/fixtures/gemma3), float32 | <= 1e-4 | "
        "passes (tests/test_parity.py) |",
        "",
        "## The planted pair",
        "",
        f"`python -m experiments.planted_real` (seed {pair['settings']['seed']}, built in "
        f"{pair['seconds']} s): the donor answers {pair['settings']['facts']} "
        "counterfactual facts (\"The Eiffel Tower is located in the city of\" -> a new city), "
        f"trained into S = `{pair['settings']['plant']}` only; trained decoy D = "
        f"`{pair['settings']['decoy']}` (other counterfactual facts, the measured ones kept by a KL "
        f"term); rescaled decoys `{pair['settings']['rescale']}` (x{pair['settings']['rescale_factor']:g}, "
        "function unchanged).",
        "",
        "| accuracy on the facts (4 phrasings each) | |",
        "| --- | --- |",
        *[f"| {k.replace('_', ' ')} | {val:.0%} |" for k, val in acc.items()],
        *[f"| demo: {k.replace('_', ' ')} | {val:.0%} |" for k, val in r["behavior"].items()],
        "",
        f"Held-out text loss (8 sentences): base {text['base']:.3f}, donor {text['donor']:.3f} "
        "nats/token.",
        "",
        "## Localization (the demo's evaluation)",
        "",
        f"`jaxpatch.studies.evaluate` (what `jaxpatch demo --pair DIR` runs) with stages "
        f"{', '.join(STAGES)}: {r['evaluate_seconds']:.0f} s. ROC AUC against S "
        f"(modules {r['planted']['module'][0]}/{r['planted']['module'][1]} in S, neurons "
        f"{r['planted']['neuron'][0]}/{r['planted']['neuron'][1]}); a dash: not run at that "
        "granularity (one exact run per neuron is too slow on a CPU) or not in this table's "
        "stages (the learned patch, activation patching and the hierarchy: the full "
        "`jaxpatch demo --pair` runs them too, about an hour more on 2 CPU cores). Heads are "
        "not scored: S is MLP neurons, no head is in it.",
        "",
        "| method | module | neuron |",
        "| --- | --- | --- |",
        *[f"| {m} | {fmt(auc['module'][m])} | {fmt(auc['neuron'][m])} |" for m in auc["module"]],
        "",
        f"Neurons, narrow then verify: ranked all {r['planted']['neuron'][1]} by integrated "
        f"gradients, patched the top {v['top_k']} and {v['controls']} random others exactly "
        f"({v['verified_fraction']:.1%} of the neurons); the shortlist holds {v['recall']:.0%} of "
        f"S's exact top {v['recall_k']} (S's neurons patched one at a time as the reference); "
        f"Spearman {v['spearman']:.2f} on the verified set.",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| exact weight patching, module ROC AUC >= 0.95 | denoise {auc['module']['exact-denoise']:.3f}, "
        f"noise {auc['module']['exact-noise']:.3f} | {'met' if module_ok else 'missed'} |",
        f"| neuron narrow -> verify recall >= 0.9 on <= 10% of neurons | {v['recall']:.2f} on "
        f"{v['verified_fraction']:.1%} | {'met' if recall_ok else 'missed'} |",
        f"| \\|dW\\| beside it (module / neuron AUC) | {fmt(auc['module']['delta-norm'])} / "
        f"{fmt(auc['neuron']['delta-norm'])} | |",
        "",
        "Stage times (s): " + ", ".join(f"{k} {val:g}" for k, val in r["timing"].items()) + ".",
        *([f"\n{r['note']}"] if r.get("note") else []),
        "",
    ]
    return "\n".join(lines)


START, END = "<!-- real-model:start -->", "<!-- real-model:end -->"


def readme_table(r: dict[str, Any]) -> str:
    """The README's short version of the results."""
    p, auc, v = r["parity"], r["auc"], r["narrow_then_verify"]
    return "\n".join([
        f"Measured by `scripts/real_model_table.py` on {r['machine']}:",
        "",
        "| what | measured |",
        "| --- | --- |",
        f"| logits vs transformers' GGUF load, largest error / logit scale | {p['max_relative_error']:.1e} "
        f"(top-5 equal on {p['top5_agree']}/{p['prompts']} prompts) |",
        f"| module ROC AUC against S: exact denoise / noise / IG / \\|dW\\| | "
        f"{auc['module']['exact-denoise']:.3f} / {auc['module']['exact-noise']:.3f} / "
        f"{auc['module']['integrated-gradients']:.3f} / {auc['module']['delta-norm']:.3f} |",
        f"| neurons: IG shortlist verified exactly | {v['recall']:.0%} of S's exact top {v['recall_k']} on "
        f"{v['verified_fraction']:.1%} of {r['planted']['neuron'][1]} neurons |",
        f"| building the pair / the evaluation's stages on it | {r['pair']['seconds']:.0f} s / "
        f"{r['evaluate_seconds']:.0f} s |",
    ])


def update_readme(r: dict[str, Any]) -> None:
    """Puts the short table between the README's markers."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{readme_table(r)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pair", type=Path, default=planted_real.default_out(0),
                        help="the pair folder (built there when missing)")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--note", help="a remark on the run, kept in the JSON and shown in the document")
    args = parser.parse_args()
    docs = ROOT / "docs"
    if args.render:
        result = json.loads((docs / "real_model.json").read_text())
    else:  # measure
        result = run(args.pair)
    if args.note:
        result["note"] = args.note
    (docs / "real_model.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (docs / "real_model.md").write_text(text)
    update_readme(result)
    print(text)


if __name__ == "__main__":
    main()
