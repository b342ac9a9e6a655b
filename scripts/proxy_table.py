"""How well the cheap one-pass metrics predict the behavior judged in generated text.

On the shipped planted pair: sets of modules (random sets of every size from 1 to n, and the
top k of the exact KL ranking) patched from the donor into the base; each set's recovery by the
KL divergence of the answer tokens' next-token distributions (teacher-forced, one forward pass)
and by the log-probability of the answers, against its recovery judged by what the patched model
writes (greedy continuations of the prompts, 6 tokens, checked by a verifier: the text ends with
the end token, i.e. the model answers and stops, as the donor does and the base never does).
Prints Pearson and Spearman correlations and how often the proxy and the judge agree on
"recovered at least half".

    python scripts/proxy_table.py [--sets 48] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxpatch  # noqa: E402
from jaxpatch import Execution, KLDivergence, LogProb, prepare  # noqa: E402
from jaxpatch.faithfulness import ranking, set_points  # noqa: E402
from jaxpatch.prompts import make_batch  # noqa: E402
from jaxpatch.studies.evaluate import default_pair_dir, load_planted  # noqa: E402
from jaxpatch.verifiers import TextJudge, verifier_from_spec  # noqa: E402

QUIET = Execution(progress=False)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sets", type=int, default=48, help="random sets of modules")
    parser.add_argument("--out", help="folder for proxy.json")
    args = parser.parse_args()
    planted = load_planted(default_pair_dir())
    config = planted.base.config
    pair = prepare(planted.base, planted.donor, make_batch(config, planted.prompts, "targets"),
                   positions="targets")
    names = [c.name for c in jaxpatch.select(config, None, "module")]
    rng = np.random.default_rng(0)
    sets = {}
    for i in range(args.sets):
        k = int(np.clip(round(np.exp(rng.uniform(0, np.log(len(names))))), 1, len(names)))
        sets[f"random {i} ({k})"] = list(rng.choice(names, k, replace=False))
    order = ranking(jaxpatch.sweep(pair, KLDivergence(), execution=QUIET), "size")
    sets.update({f"top {k} by KL": order[:k] for k in (1, 2, 4, 8, 16, 24, 32)})
    judge = TextJudge("ends-with:<eos>", verifier_from_spec("ends-with:<eos>"), planted.prompts,
                      6, planted.base.tokenizer.decode)
    judged = {k: v[1] for k, v in set_points(pair, judge, sets, execution=QUIET).items()}
    rows = {"kl": {k: v[1] for k, v in set_points(pair, KLDivergence(), sets,
                                                   execution=QUIET).items()},
            "logprob": {k: v[1] for k, v in set_points(pair, LogProb(), sets,
                                                        execution=QUIET).items()}}
    y = np.array([judged[k] for k in sets])
    summary = {}
    print(f"{len(sets)} sets of modules; judged: {judge.name} in {judge.n_tokens} generated tokens "
          f"(recovery: mean {y.mean():.3f}, {np.mean(y >= 0.5):.2f} of sets at least 0.5)")
    print("| proxy | Pearson | Spearman | agree on >= 0.5 |")
    print("| --- | --- | --- | --- |")
    for proxy, values in rows.items():
        x = np.array([values[k] for k in sets])
        summary[proxy] = {"pearson": float(np.corrcoef(x, y)[0, 1]), "spearman": spearman(x, y),
                          "agreement": float(np.mean((x >= 0.5) == (y >= 0.5)))}
        s = summary[proxy]
        print(f"| {proxy} | {s['pearson']:.3f} | {s['spearman']:.3f} | {s['agreement']:.2f} |")
    if args.out:
        (Path(args.out) / "proxy.json").write_text(json.dumps(
            {"judge": judge.describe(), "sets": sets, "judged": judged, "proxies": rows,
             "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
