"""The planted-pair study's report: its summary lines and the self-contained HTML page that
`jaxpatch demo` writes, with the JSON and CSV behind it (`write_run`, `read_run`)."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpatch.figures import faithfulness_png, heatmap_png, hierarchy_png, roc_png
from jaxpatch.results import SweepResult

__all__ = ["METHOD_LABELS", "CAVEATS", "summary_lines", "finding", "render_html", "write_run",
           "auc_csv", "read_run"]

METHOD_LABELS: dict[str, str] = {
    "exact-denoise": "exact weight patching, denoise", "exact-noise": "exact weight patching, noise",
    "first-order": "first-order attribution", "integrated-gradients": "integrated gradients",
    "learned-patch": "learned patch (gates, denoise)",
    "activation-denoise": "activation patching, denoise",
    "activation-noise": "activation patching, noise", "delta-norm": "‖donor − base‖ per component",
    "random": "random ranking",
}

CAVEATS: tuple[str, ...] = (
    "Which components moved, and why, is a choice of the experiment. With decoys (the shipped "
    "pair), a set D outside S learned another instruction while a KL term held the measured task "
    "fixed, and S's neighbouring heads and neurons were rescaled without changing the function, so "
    "|delta W| is large outside S (the weight-movement table says how large). Without decoys only "
    "low-rate drift moves outside S and |delta W| separates S almost by construction.",
    "A decoy is irrelevant as a set, not component by component: D's large changes leave the "
    "task unchanged together, so one D component patched alone can move the metric, and exact "
    "patching then (truthfully) ranks it above parts of S that the task did not end up using.",
    "Rescaling a key/value head's values against its query heads' outputs splits across two "
    "head-granularity components (v is in the key/value head, o in the query head), so patching "
    "one of them alone is not function-preserving: exact denoise at head granularity sees it.",
    "S was trained on the very task and prompt distribution the metric measures (log-probability "
    "of the answers), which favors methods that read that metric: exact patching and gradients.",
    "Activation patching answers a different question: it also credits components that carry or "
    "use S's signal downstream (here labelled negatives), so its AUC against a planted *source* "
    "understates what it is good at.",
    "Components differ in size (a norm vector vs. a projection; a query head vs. a key/value "
    "head), which biases size-dependent scores such as |delta W| and summed attributions.",
    "One task, one small architecture, and few positives per granularity (AUC moves in steps of "
    "1/(positives x negatives)); the spread over seeds is in the README's table.",
)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary of a planted-pair evaluation, a line per finding.

    Example:
        >>> summary_lines(ev.summary)[0][:58]
        'pair: map task, seed 0, planted set S = layers.0.self_attn'
        >>> summary_lines(ev.summary)[4]  # neuron granularity was not evaluated
        'narrow-then-verify: not run'
    """
    pair, acc, grans = summary["pair"], summary["behavior"], summary["granularities"]
    order = [g for g in ("module", "head", "neuron") if g in grans]

    def aucs(method: str) -> str:
        return "/".join("-" if grans[g]["auc"][method] is None else f"{grans[g]['auc'][method]:.2f}"
                        for g in order)

    ratio = acc["base_with_S_from_donor"] / acc["donor"] if acc["donor"] else float("nan")
    v = summary.get("narrow_then_verify") or {}
    lines = [
        f"pair: {pair['task']} task, seed {pair['seed']}, planted set S = {pair['plant']}",
        f"accuracy: base {acc['base']:.0%}, donor {acc['donor']:.0%}, base with S from donor "
        f"{acc['base_with_S_from_donor']:.0%} ({ratio:.0%} of donor), donor with S from base "
        f"{acc['donor_with_S_from_base']:.0%}",
        f"ROC AUC vs S ({'/'.join(order)}): exact weight patching denoise {aucs('exact-denoise')}, "
        f"noise {aucs('exact-noise')}",
        f"  activation patching denoise {aucs('activation-denoise')}, first-order "
        f"{aucs('first-order')}, IG {aucs('integrated-gradients')}, learned patch "
        f"{aucs('learned-patch')}, |dW| {aucs('delta-norm')}, "
        f"random {aucs('random')}",
    ]
    if v:
        lines.append(f"narrow-then-verify ({v['granularity']}s): exact patches on "
                     f"{v['verified_fraction']:.1%} caught {v['recall']:.0%} of "
                     f"{_recall_reference(v)}; Spearman {v['spearman']:.2f}")
    else:
        lines.append("narrow-then-verify: not run")
    p = (summary.get("hierarchy") or {}).get("planted")
    if p:
        lines.append(f"hierarchy (modules): source precision {p['precision']:.2f}, recall "
                     f"{p['recall']:.2f} against S; {p['outside_S_high_activation_not_source']} of "
                     f"{p['outside_S_high_activation']} high-activation components outside S not "
                     f"called sources ({p['outside_S_aggregation_or_execution']} aggregation or "
                     "execution)")
    for direction, curves in (summary.get("faithfulness") or {}).items():
        methods = {m: c["cpr"] for m, c in curves.items() if m != "S first"}
        best = max(methods, key=lambda m: methods[m])
        lines.append(f"faithfulness ({direction}, modules): CPR of S's own curve "
                     f"{curves['S first']['cpr']:.2f}; best ranking {best} {methods[best]:.2f}, "
                     f"delta-norm {methods.get('delta-norm', float('nan')):.2f}")
    return lines


def finding(summary: Mapping[str, Any]) -> str:
    """What the run found, in a few plain sentences: the behavior, the method that separates
    the planted set best at each granularity, the hierarchy's sources and the best faithfulness.

    Example:
        >>> finding(ev.summary)[:60]
        'Behavior: log-probability of the answers of the map task (ba'
    """
    pair, acc, grans, metric = (summary["pair"], summary["behavior"], summary["granularities"],
                                summary["metric"])
    what = "log-probability of the answers" if metric["name"] == "logprob" else metric["name"]
    sentences = [f"Behavior: {what} of the {pair['task']} task (base {acc['base']:.0%} exact "
                 f"answers, donor {acc['donor']:.0%}; the base with S's donor weights "
                 f"{acc['base_with_S_from_donor']:.0%})."]
    best = []
    for g in ("module", "head", "neuron"):
        if g in grans:
            scored = {m: a for m, a in grans[g]["auc"].items() if a is not None and m != "random"}
            top = max(scored, key=lambda m: scored[m])
            best.append(f"{g}s: {_plain(METHOD_LABELS.get(top, str(top)))}, ROC AUC {scored[top]:.2f}")
    if best:
        sentences.append("The planted set S is separated best by: " + "; ".join(best)
                         + " (a random ranking: 0.50).")
    p = (summary.get("hierarchy") or {}).get("planted")
    if p:
        sentences.append(f"The hierarchy's sources match S with precision {p['precision']:.2f} "
                         f"and recall {p['recall']:.2f}.")
    curves = (summary.get("faithfulness") or {}).get("denoise")
    if curves:
        ranked = {m: c["cpr"] for m, c in curves.items() if m != "S first"}
        top = max(ranked, key=lambda m: ranked[m])
        sentences.append(f"Patched together, the top modules of {_plain(METHOD_LABELS.get(top, str(top)))} "
                         f"recover the behavior fastest (CPR {ranked[top]:.2f}; S's own curve "
                         f"{curves['S first']['cpr']:.2f}).")
    return " ".join(sentences)


def _plain(label: str) -> str:
    """A method label that reads inside a sentence: "exact weight patching (noise)"."""
    return label if "(" in label or ", " not in label else label.replace(", ", " (", 1) + ")"


def _faithfulness_section(curves: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every ranking's CPR and CMD in both directions, with the curves drawn."""
    labels = list(curves.get("denoise", {}))
    rows = [[METHOD_LABELS.get(m, m) if m != "S first" else "the planted set S first (reference)",
             *(float(curves[d][m][key]) for d in ("denoise", "noise") for key in ("cpr", "cmd"))]
            for m in labels]
    figures = "".join(_img(faithfulness_png(list(curves[d].values()), f"{d}: top k modules "
                                            "patched together"), f"faithfulness {d}")
                      for d in ("denoise", "noise") if d in curves)
    return ["<h2>Faithfulness: the top k modules of each ranking patched together</h2>",
            "<p>f(k) is the share of the behavior the top k modules of a ranking carry together "
            "(denoise: their donor weights in the base; noise: their base weights in the "
            "donor). CPR is the area under f over k / n (higher is better), CMD the area "
            "between f and 1 (lower is better). Single effects can rank well and still miss "
            "components that only work together; S's own curve is the reference.</p>",
            _table(["ranking", "CPR denoise", "CMD denoise", "CPR noise", "CMD noise"], rows,
                   best=[None, "max", "min", "max", "min"]),
            f"<div class=row>{figures}</div>"]


def _recall_reference(v: Mapping[str, Any]) -> str:
    """What a narrow-then-verify recall was measured against."""
    if v.get("reference") == "planted":
        return f"S's exact top {v['recall_k']} (not swept exhaustively: too many {v['granularity']}s)"
    return f"the exact top {v['recall_k']}"


def _img(png: bytes, alt: str) -> str:
    import base64

    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


class _Html(str):
    """A table cell's HTML, written as is (everything else is escaped)."""


def _why(reason: str, also: str | None) -> _Html:
    """A hierarchy row's reason folded: its gist (up to the first `;` or `:`) shown, the whole
    reason and the "also" notes one click away, so the table stays readable.

    Example:
        >>> _why("late; drops 0.4", None)
        '<details><summary>late</summary>late; drops 0.4</details>'
    """
    full = reason + (f" (also: {also})" if also else "")
    gist = re.split(r"[;:(]", reason, maxsplit=1)[0].strip()
    if gist == full:
        return _Html(html.escape(full))
    return _Html(f"<details><summary>{html.escape(gist)}</summary>{html.escape(full)}</details>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]],
           best: Sequence[str | None] | None = None) -> str:
    """An HTML table; `best` ("max", "min" or None per column) marks each column's best value
    in bold."""
    marks: dict[int, float] = {}
    for j, rule in enumerate(best or []):
        values = [r[j] for r in rows if isinstance(r[j], float) and math.isfinite(r[j])]
        if rule and values:
            marks[j] = max(values) if rule == "max" else min(values)

    def cell(j: int, x: Any) -> str:
        if isinstance(x, float):
            if not math.isfinite(x):
                return "<td class=num>-</td>"
            text = f"{x:.3f}"
            return f"<td class=num><b>{text}</b></td>" if marks.get(j) == x else f"<td class=num>{text}</td>"
        return f"<td>{x if isinstance(x, _Html) else html.escape(str(x))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(j, x) for j, x in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(summary: Mapping[str, Any], results: Mapping[str, SweepResult]) -> str:
    """The self-contained HTML report of a planted-pair evaluation (images inlined).

    Arguments:
        summary: `results.json` (`jaxpatch.studies.evaluate.Evaluation.summary`).
        results: the sweep-like tables by `"{granularity}/{method}"`.

    Returns:
        The HTML document.

    Example:
        >>> page = render_html(ev.summary, ev.results)
        >>> page.startswith("<!doctype html>"), page.count("<img") >= 2
        (True, True)
    """
    grans = summary["granularities"]
    order = [g for g in ("module", "head", "neuron") if g in grans]
    methods = list(next(iter(grans.values()))["auc"])
    parts = ["<h1>jaxpatch: localization on a planted pair</h1>",
             f"<p class=finding>{html.escape(finding(summary))}</p>",
             "<details><summary>The run's summary as printed</summary><pre class=summary>"
             + html.escape("\n".join(summary_lines(summary))) + "</pre></details>"]
    acc = summary["behavior"]
    parts += ["<h2>Behavior</h2>",
              f"<p>Exact-match accuracy of the greedy answer on {summary['pair']['task']} "
              "instructions held out from the patching prompts.</p>",
              _table(["model", "accuracy"], [[k.replace("_", " "), float(v)] for k, v in acc.items()])]
    parts += ["<h2>ROC AUC against the planted set</h2>",
              "<p>Each method ranks every component by the size of its score (|delta W|: the "
              "norm of donor − base, no patching at all). AUC is the chance that a component in "
              "S outranks one outside it: 0.5 is a random ranking, 1.0 puts all of S first. The "
              "best value per granularity is in bold.</p>",
              _table(["method", *(f"{g} ({sum(grans[g]['planted'])}/{len(grans[g]['names'])} in S)"
                                  for g in order)],
                     [[METHOD_LABELS.get(m, m), *(float("nan") if grans[g]["auc"][m] is None
                                                  else float(grans[g]["auc"][m]) for g in order)]
                      for m in methods], best=[None, *(["max"] * len(order))])]
    narrowed = [g for g in order if not grans[g].get("exhaustive", True)]
    if narrowed:
        parts.append(f"<p>Not swept exhaustively ({', '.join(narrowed)}): too many components "
                     "for one exact run each, so only the attribution methods, |delta W| and the "
                     "random baseline rank them all (a dash: not run); exact patches verify the "
                     "attribution shortlist below.</p>")
    parts.append("<div class=row>" + "".join(
        _img(roc_png(grans[g]["planted"], {m: x for m, x in grans[g]["importance"].items()
                                           if x is not None}, f"{g} granularity"), f"ROC {g}")
        for g in order) + "</div>")
    v = summary.get("narrow_then_verify") or {}
    if v:
        parts += ["<h2>Narrow, then verify</h2>",
                  f"<p>Ranked all {v['granularity']}s by {v['method']}, patched the top "
                  f"{v['top_k']} and {v['controls']} random others exactly "
                  f"({v['verified_fraction']:.1%} of all). Recall of {_recall_reference(v)}: "
                  f"<b>{v['recall']:.2f}</b>; Spearman correlation of attribution "
                  f"and exact effects on the verified set: <b>{v['spearman']:.2f}</b>.</p>",
                  _table(["most misranked", "attribution rank", "exact rank"],
                         [[m["name"], m["attribution_rank"], m["exact_rank"]] for m in v["misranked"]])]
    if summary.get("completeness"):
        c = summary["completeness"]
        parts.append(f"<p>Integrated gradients' completeness: attributions sum to "
                     f"{c['sum_of_attributions']:.4g} against a score difference of "
                     f"{c['score_difference']:.4g} (relative gap {c['relative_gap']:.1e}).</p>")
    parts.append("<h2>Exact weight patching</h2>")
    parts.append("<p>Effects of each component patched alone (red: towards the other model, "
                 "blue: away from it); the planted set S is outlined.</p>")
    for g in order:
        inside = [n for n, yes in zip(grans[g]["names"], grans[g]["planted"]) if yes]
        row = [_img(heatmap_png(results[f"{g}/{d}"], f"{g}s, {d}", marked=inside), f"{g} {d}")
               for d in ("exact-denoise", "exact-noise") if f"{g}/{d}" in results]
        parts.append("<div class=row>" + "".join(row) + "</div>")
    for d in ("exact-denoise", "exact-noise"):
        key = f"{order[0]}/{d}"
        if key in results:
            planted = dict(zip(grans[order[0]]["names"], grans[order[0]]["planted"]))
            parts += [f"<h3>Top {order[0]}s, {d}</h3>",
                      _table(["component", "effect", "in S"],
                             [[n, e, "yes" if planted.get(n) else ""] for n, e in results[key].top(10)])]
    if summary.get("hierarchy"):
        parts += _hierarchy_section(summary["hierarchy"], dict(zip(
            grans["module"]["names"], grans["module"]["planted"])) if "module" in grans else {})
    if summary.get("faithfulness"):
        parts += _faithfulness_section(summary["faithfulness"])
    m = summary["metric"]
    moved = summary["pair"].get("movement") or {}
    if moved:
        settings = summary["pair"].get("settings", {})
        parts += ["<h2>How far the weights moved</h2>",
                  "<p>Frobenius norm of donor - base per component (what |delta W| ranks by). "
                  f"Trained decoys: {html.escape('; '.join(settings.get('decoys') or []) or 'none')}. "
                  f"Rescaled: {html.escape('; '.join(settings.get('rescale') or []) or 'none')}. "
                  "A ratio above 1 means some component outside S moved further than the least-moved "
                  "component in S.</p>",
                  _table(["granularity", "smallest in S", "mean in S", "mean in D", "largest outside S",
                          "ratio"],
                         [[g, *(float("nan") if m[k] is None else float(m[k]) for k in (
                             "S_min", "S_mean", "D_mean", "outside_S_max", "outside_max_over_S_min"))]
                          for g, m in moved.items()])]
    parts += ["<h2>What could make this comparison unfair</h2>",
              "<ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in CAVEATS) + "</ul>",
              "<h2>Run</h2>",
              f"<p>Metric: {html.escape(m['name'])} of the answers over {m['prompts']} prompts "
              f"(base {m['base_score']:.4g}, donor {m['donor_score']:.4g}). Pair: "
              f"{html.escape(str(summary['pair']['folder']))}.</p>",
              _table(["stage", "seconds"], [[k, float(v)] for k, v in summary["timing"].items()])]
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222;"
             "padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px}td.num{text-align:right;font-variant-numeric:tabular-nums}"
             ".row{display:flex;flex-wrap:wrap;gap:8px}.row img{max-width:100%}"
             "pre.summary{background:#f4f4f4;padding:.8em;white-space:pre-wrap}"
             "p.finding{font-size:1.15em;line-height:1.5;background:#eef4ff;padding:.8em 1em;"
             "border-left:4px solid #3366cc}")
    return ("<!doctype html><html><head><meta charset=utf-8><title>jaxpatch report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def _hierarchy_section(h: Mapping[str, Any], planted: Mapping[str, bool]) -> list[str]:
    """The report's hierarchy section: the figure, the score against S, the non-inert rows."""
    p = h.get("planted") or {}
    lines = [
        "<h2>Source-level hierarchy</h2>",
        "<p>Every module sorted into source, aggregation (and routing), execution or inert by "
        "<code>jaxpatch.hierarchy.trace_hierarchy</code> (the same as <code>jaxpatch trace</code>): "
        "sources are the validated set of donor weights that recovers the behavior; aggregation "
        "components have a high activation-patching score but their output is recovered by their "
        "suppliers' weights; execution components come after the anchor layer and are needed for "
        "the output. Edges: patching the supplier's weights alone recovers that share of the "
        "target's output anchor.</p>"]
    if p:
        lines.append(
            f"<p>Against the planted set at module granularity: <code>source</code> precision "
            f"<b>{p['precision']:.2f}</b>, recall <b>{p['recall']:.2f}</b>; "
            f"{p['outside_S_high_activation_not_source']} of {p['outside_S_high_activation']} "
            "components outside S with a high activation-patching score were correctly not "
            f"called sources ({p['outside_S_aggregation_or_execution']} of them aggregation or "
            f"execution). The validated sources together recover {h['sources_recovery']:.3f}.</p>")
    lines.append("<div class=row>" + _img(hierarchy_png(h, planted=planted or None),
                                          "hierarchy") + "</div>")
    rows = [[n["name"], n["class"], "yes" if planted.get(n["name"]) else "",
             float(n["weight_score"]), float(n["activation_score"]),
             float("nan") if n["supplied"] is None else float(n["supplied"]),
             float("nan") if n["execution"] is None else float(n["execution"]),
             _why(n["reason"], n["also"])]
            for n in h["nodes"] if n["class"] != "inert" or n["activation_score"] >= 0.3]
    lines.append(_table(["component", "class", "in S", "weight", "activation", "supplied",
                         "execution", "why"], rows))
    edges = sorted(h["edges"], key=lambda e: -max(e["score"], e["activation_score"] or 0.0))[:20]
    lines += ["<h3>Where the signal is computed, where it passes through</h3>",
              "<p>For each supplier -> target edge: the share of the target's output anchor "
              "recovered by patching the supplier's <i>weights</i> (computed there) and by "
              "patching its <i>output activation</i> (carried through it). A high activation "
              "score with a low weight score is a component that passes the signal on.</p>",
              _table(["supplier", "target", "weights", "activation"],
                     [[e["supplier"], e["target"], float(e["score"]),
                       float("nan") if e["activation_score"] is None else float(e["activation_score"])]
                      for e in edges])]
    return lines


def write_run(summary: Mapping[str, Any], results: Mapping[str, SweepResult], out: str | Path,
              overwrite: bool = False) -> None:
    """Writes a run folder atomically: `results.json`, `auc.csv`, `scores/<granularity>-<method>
    .json/.csv` and `report.html`.

    Example:
        >>> write_run(ev.summary, ev.results, tmp / "run")
        >>> sorted(f.name for f in (tmp / "run").iterdir())
        ['auc.csv', 'report.html', 'results.json', 'scores']
    """
    from jaxpatch.runs.atomic import atomic_directory

    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        (tmp / "auc.csv").write_text(auc_csv(summary))
        (tmp / "scores").mkdir()
        for key, result in results.items():
            stem = key.replace("/", "-")
            (tmp / "scores" / f"{stem}.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
            (tmp / "scores" / f"{stem}.csv").write_text(result.to_csv())
        (tmp / "report.html").write_text(render_html(summary, results))


def auc_csv(summary: Mapping[str, Any]) -> str:
    """The AUC table as CSV (`method,granularity,auc`).

    Example:
        >>> auc_csv({"granularities": {"module": {"auc": {"random": 0.5}}}})
        'method,granularity,auc\\nrandom,module,0.5\\n'
    """
    rows = ["method,granularity,auc"]
    for g, data in summary["granularities"].items():
        rows += [f"{m},{g},{a:.6g}" for m, a in data["auc"].items() if a is not None]
    return "\n".join(rows) + "\n"


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, SweepResult]]:
    """Reads a run folder written by `write_run`.

    Raises:
        CheckpointNotFoundError: the folder or its `results.json` is missing.
        InvalidInputError: a file is not what `write_run` writes.

    Example:
        >>> write_run(ev.summary, ev.results, tmp / "run")
        >>> summary, results = read_run(tmp / "run")
        >>> summary == ev.summary, results == ev.results
        (True, True)
    """
    from jaxpatch.errors import CheckpointNotFoundError, InvalidInputError

    folder = Path(run_dir)
    file = folder / "results.json"
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: not found (is {folder} a `jaxpatch demo` run folder?)")
    try:
        summary = json.loads(file.read_text())
        if summary.get("format") != "jaxpatch.planted-evaluation/1":
            raise InvalidInputError(f"{file}: format {summary.get('format')!r} is not a planted-pair "
                                    "evaluation")
        results = {}
        for path in sorted((folder / "scores").glob("*.json")):
            granularity, method = path.stem.split("-", 1)
            results[f"{granularity}/{method}"] = SweepResult.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise InvalidInputError(f"{folder}: cannot read the saved results "
                                f"({type(e).__name__}: {e})") from None
    return summary, results
