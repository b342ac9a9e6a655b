"""The paper's own experiment on a real model: where an instruction-tuned gemma-3-270m keeps its
format instructions, found by every localization method and judged by what the patched models
write.

For each studied instruction of an instruction-tuned pair (`python -m experiments.instruct_pair`):

1. **The behavior.** The vector anchor of that instruction (the paper's: the donor-minus-base
   direction of the last block's output at the last prompt token, fitted on `score_prompts`
   held-out questions with the instruction) scores every ranking method; the text judge (the
   instruction's verifier on `new_tokens` greedy tokens of `judge_prompts` other held-out
   questions, 0 at the base's rate and 1 at the donor's) judges every set.
2. **Rankings** at module, head and neuron granularity: exact weight patching (denoise, and at
   module granularity noise), first-order and integrated-gradients attribution, the learned patch
   (module), |dW| and random rankings (the band). Neurons (36,864) are narrowed by integrated
   gradients and the shortlist verified exactly (`jaxpatch.localize`): the ranking is the verified
   order, then the rest by attribution.
3. **Faithfulness curves** of every ranking, judged by generated text (denoise: the top k
   components from the donor into the base; and at `noise_curves` granularities noise: from
   the base into the donor), with CPR and CMD (`jaxpatch.faithfulness_curves`). A direction's
   curves are drawn at a granularity only where all its components together move at least
   `min_whole` of the behavior; the whole granularity's point is reported either way.
4. **Heads route, neurons are sources?** Per head and per shortlisted neuron, weight patching's
   effect against activation patching's (a component whose output carries the behavior but whose
   own weights do not is routing what it receives; one whose weights alone recover its effect is
   a source).
5. **The hierarchy** (module granularity, for `hierarchy` instructions): sources, aggregation,
   execution, with the figure.
6. **Position-restricted patches**: the whole donor patched only at the prompt, the response,
   the first response token or the instruction's tokens, judged by text; and the exact module
   ranking under each restriction.
7. **Two donors** (with `--second`): the top-10 modules of each donor's exact and
   integrated-gradients rankings and their Jaccard overlap, beside |dW|'s.

Writes `instruct_pair.json`, `instruct_pair.md` and the figures (`instruct_pair/*.png`) into
`--out`.

    python -m experiments.instruct_study --pair ~/.cache/jaxpatch/pairs/gemma3-270m-instruct-seed0 \\
        --second ~/.cache/jaxpatch/pairs/gemma3-270m-instruct-seed1 --out docs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

import jaxpatch
from experiments.instruct_pair import Settings as PairSettings
from experiments.instruct_pair import default_out, reply_text
from jaxpatch import Execution, GateTraining, Prompt, TraceSearch, VectorAnchor, prepare
from jaxpatch.chat import ChatTemplate
from jaxpatch.errors import InvalidInputError, JaxpatchError
from jaxpatch.faithfulness import faithfulness_curves, ranking, set_points, size_ladder
from jaxpatch.figures import faithfulness_png, hierarchy_png
from jaxpatch.localization import Verification, localize
from jaxpatch.modes import PATCH_AT, AttributionMethod, Granularity, PairDirection
from jaxpatch.pair import delta_norms
from jaxpatch.prompts import make_batch, marked_positions
from jaxpatch.runs.atomic import atomic_directory
from jaxpatch.verifiers import TextJudge, verifier_from_spec

__all__ = ["StudySettings", "InstructPair", "load_pair", "instruction_prompts", "study", "findings",
           "markdown", "main"]

QUIET = Execution(progress=False)
GRANULARITIES: tuple[Granularity, ...] = ("module", "head", "neuron")


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What the study measures (every field has a working default).

    Attributes:
        instructions: the instructions studied (capitals, which the issue names, and two whose
            verifier the base almost never satisfies in `new_tokens` tokens: no-commas, with
            a base rate of 0.20 there, let random rankings score as well as any).
        score_prompts: held-out questions the vector anchor is fitted and scored on.
        judge_prompts: other held-out questions the text judge generates from.
        new_tokens: tokens generated per judged prompt.
        ig_steps: integrated gradients' steps.
        learned_steps: the learned patch's optimizer steps.
        sparsity: the learned patch's penalty per module.
        neurons_verified: neurons verified exactly after narrowing.
        random: random rankings drawn for the band, per granularity.
        noise_curves: the granularities whose noise-direction (necessity) curves are drawn
            too (every granularity's denoise curves are).
        min_whole: a direction's curves are drawn at a granularity only where all its
            components together move at least this share of the behavior (below it, no
            ranking's curve can rise, so the curves could not tell rankings apart).
        hierarchy: the instructions whose hierarchy is traced.
        top: the size of the top sets compared between donors.
        seed: the random rankings' seed.
    """

    instructions: tuple[str, ...] = ("capitals", "lowercase", "title")
    score_prompts: int = 8
    judge_prompts: int = 10
    new_tokens: int = 16
    ig_steps: int = 8
    learned_steps: int = 100
    sparsity: float = 0.01
    neurons_verified: int = 128
    random: int = 2
    noise_curves: tuple[Granularity, ...] = ("head", "neuron")
    min_whole: float = 0.25
    hierarchy: tuple[str, ...] = ("capitals",)
    top: int = 10
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class InstructPair:
    """An instruction-tuned pair's folder, loaded.

    Attributes:
        base, donor: the models.
        record: its `instruct.json`.
        folder: where it lies.
    """

    base: jaxpatch.Model
    donor: jaxpatch.Model
    record: dict[str, Any]
    folder: Path


def load_pair(folder: str | Path) -> InstructPair:
    """Loads an instruction-tuned pair (`python -m experiments.instruct_pair`).

    Raises:
        InvalidInputError: the folder is not one (named in one line).
    """
    folder = Path(folder).expanduser()
    record_path = folder / "instruct.json"
    if not record_path.is_file():
        raise InvalidInputError(f"{folder}: not an instruction-tuned pair (no instruct.json); build "
                                "one with python -m experiments.instruct_pair")
    record = json.loads(record_path.read_text())
    return InstructPair(jaxpatch.load(folder / "base"), jaxpatch.load(folder / "donor"), record,
                        folder)


def instruction_prompts(pair: InstructPair, name: str, start: int, count: int) -> list[Prompt]:
    """Held-out questions `start .. start + count` with instruction `name`, in the donor's chat
    format, the instruction's tokens marked (for patches restricted to them).

    Raises:
        InvalidInputError: an unknown instruction, or too few questions.
    """
    instructions = pair.record["instructions"]
    if name not in instructions:
        raise InvalidInputError(f"no instruction {name!r} in {pair.folder} (it has "
                                f"{', '.join(instructions)})")
    lines = (pair.folder / "prompts" / f"{name}.jsonl").read_text().splitlines()
    if start + count > len(lines):
        raise InvalidInputError(f"{pair.folder}: {len(lines)} held-out questions for {name!r}, "
                                f"{start + count} asked for")
    template, tokenizer = pair.donor.chat_template, pair.donor.tokenizer
    assert isinstance(template, ChatTemplate) and tokenizer is not None
    text = instructions[name]["text"]
    prompts = []
    for line in lines[start:start + count]:
        messages = [{"role": "user", "content": json.loads(line)["instruction"]}]
        rendered = template.render(messages, add_generation_prompt=True)
        marked = marked_positions(tokenizer, rendered, text) if text else ()
        prompts.append(Prompt(template.token_ids(tokenizer, messages), marked=marked))
    return prompts


def _timed(timings: dict[str, float], label: str, make: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = make()
    timings[label] = round(time.perf_counter() - start, 1)
    return out


def _dw_rankings(pair: InstructPair,
                 granularities: Sequence[Granularity] = GRANULARITIES) -> dict[str, list[str]]:
    """|dW|'s ranking at each granularity: the same for every instruction, so computed once."""
    config = pair.base.config
    out = {}
    for granularity in granularities:
        items = jaxpatch.select(config, None, granularity)
        norms = delta_norms(config, pair.base.params, pair.donor.params, items)
        out[granularity] = ranking(dict(zip([c.name for c in items], norms.tolist())), "size")
    return out


def _rankings(pair: Any, metric: VectorAnchor, granularity: Granularity, s: StudySettings,
              dw: list[str], timings: dict[str, float]
              ) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Every method's ranking at one granularity (best first, by the size of the effect; `dw`
    is |dW|'s), and what else the methods report."""
    items = jaxpatch.select(pair.config, None, granularity)
    out: dict[str, list[str]] = {}
    extra: dict[str, Any] = {}

    def timed(label: str, make: Callable[[], Any]) -> Any:
        return _timed(timings, f"{granularity} {label}", make)

    if granularity == "neuron":
        found = timed("narrow then verify", lambda: localize(
            pair, metric, granularity="neuron", method="integrated-gradients", steps=s.ig_steps,
            verify=Verification(top_k=s.neurons_verified, controls=16), execution=QUIET))
        verified = ranking(found.exact, "size")
        rest = [n for n in ranking(found.attribution, "size") if n not in set(verified)]
        out["narrow then verify"] = verified + rest
        out["integrated gradients"] = ranking(found.attribution, "size")
        extra["neurons"] = {"shortlist": found.shortlist, "spearman": found.spearman,
                            "exact": dict(zip(found.exact.names, found.exact.effect.tolist()))}
    else:
        exact = timed("exact denoise", lambda: jaxpatch.sweep(pair, metric, candidates=items,
                                                               execution=QUIET))
        out["exact denoise"] = ranking(exact, "size")
        extra["exact_denoise"] = dict(zip(exact.names, exact.effect.tolist()))
        if granularity == "module":
            noise = timed("exact noise", lambda: jaxpatch.sweep(
                pair, metric, candidates=items, direction="noise", execution=QUIET))
            out["exact noise"] = ranking(noise, "size")
        methods: tuple[tuple[AttributionMethod, str], ...] = (
            ("first-order", "first-order"), ("integrated-gradients", "integrated gradients"))
        for method, label in methods:
            scored = timed(label, lambda m=method: jaxpatch.attribute(
                pair, metric, granularity=granularity, method=m, steps=s.ig_steps,
                execution=QUIET))
            out[label] = ranking(scored, "size")
        if granularity == "module":
            learned = timed("learned patch", lambda: jaxpatch.learn_patch(
                pair, metric, granularity="module", sparsity=s.sparsity,
                training=GateTraining(steps=s.learned_steps), execution=QUIET))
            out["learned patch"] = ranking(dict(zip(learned.names, learned.probabilities.tolist())),
                                           "size")
            extra["learned"] = {"selected": learned.selected, "effect": learned.effect}
    out["|dW|"] = dw
    return out, extra


def _ladder(n: int, granularity: Granularity) -> list[int]:
    """The sizes measured: doubling from 1 (modules, heads); for neurons, quadrupling from 16
    (each size is a text-judged generation of every prompt)."""
    if granularity != "neuron":
        return size_ladder(n)
    sizes, k = [0], 16
    while k < n:
        sizes.append(k)
        k *= 4
    return sizes + [n]


def _curves(pair: Any, judge: TextJudge, rankings: dict[str, list[str]], granularity: Granularity,
            s: StudySettings, timings: dict[str, float]) -> dict[str, Any]:
    """Per direction: what all the granularity's components together move (`whole`), and where
    that is at least `s.min_whole`, every ranking's text-judged curve and a band of random
    rankings (`curves`, empty otherwise)."""
    names = rankings["|dW|"]
    sizes = _ladder(len(names), granularity)
    rng = np.random.default_rng([s.seed, len(names)])
    shuffles = {f"random {i}": list(rng.permutation(names)) for i in range(s.random)}
    out: dict[str, Any] = {}
    directions: tuple[PairDirection, ...] = (
        ("denoise", "noise") if granularity in s.noise_curves else ("denoise",))
    for direction in directions:
        whole = _timed(timings, f"{granularity} {direction} all", lambda d=direction: set_points(
            pair, judge, {"all": names}, granularity=granularity, direction=d,
            execution=QUIET)["all"][1])
        curves = {}
        if whole >= s.min_whole:
            curves = _timed(timings, f"{granularity} {direction} curves", lambda d=direction, w=whole: {
                label: c.to_dict() for label, c in faithfulness_curves(
                    pair, judge, {**rankings, **shuffles}, granularity=granularity, direction=d,
                    sizes=sizes, whole=w, execution=QUIET).items()})
        out[direction] = {"whole": whole, "curves": curves}
    return out


def _routing(pair: Any, metric: VectorAnchor, neurons: Sequence[str],
             exact_heads: dict[str, float], exact_neurons: dict[str, float],
             timings: dict[str, float]) -> dict[str, Any]:
    """Per head and per shortlisted neuron: weight patching's effect beside activation
    patching's. A component whose activation carries the behavior (activation effect at least
    0.05) is a source when its weights alone recover at least half of it, a router otherwise."""
    activation = {
        "head": _timed(timings, "head activation", lambda: jaxpatch.activation_patching(
            pair, metric, granularity="head", execution=QUIET)),
        "neuron": _timed(timings, "neuron activation", lambda: jaxpatch.activation_patching(
            pair, metric, granularity="neuron", selector=list(neurons), execution=QUIET))}
    weight = {"head": exact_heads, "neuron": exact_neurons}
    out: dict[str, Any] = {}
    for kind, result in activation.items():
        rows = []
        for name, a in zip(result.names, result.effect.tolist()):
            if name in weight[kind] and abs(a) >= 0.05:
                w = weight[kind][name]
                rows.append({"name": name, "activation": a, "weight": w, "ratio": w / a})
        sources = [r for r in rows if r["ratio"] >= 0.5]
        out[kind] = {"carrying": len(rows), "sources": len(sources),
                     "share_sources": len(sources) / len(rows) if rows else None,
                     "median_ratio": float(np.median([r["ratio"] for r in rows])) if rows else None,
                     "rows": sorted(rows, key=lambda r: -abs(r["activation"]))[:24]}
    heads, neurons_ = out["head"]["share_sources"], out["neuron"]["share_sources"]
    out["holds"] = (heads is not None and neurons_ is not None and neurons_ > heads)
    return out


def _restricted(pair: InstructPair, batch: Any, judge: TextJudge, metric: VectorAnchor,
                top: Sequence[str], timings: dict[str, float]) -> dict[str, Any]:
    """The whole donor and the top modules patched only at each kind of position, judged by
    text; and for the two halves of every sequence (the prompt before its last token, the
    response), the exact module ranking under that restriction."""
    everything = [c.name for c in jaxpatch.select(pair.base.config, None, "module")]
    out: dict[str, Any] = {}
    for at in PATCH_AT:
        restricted = prepare(pair.base, pair.donor, batch, patch_at=at)
        points = _timed(timings, f"positions {at}", lambda r=restricted: set_points(
            r, judge, {"whole donor": everything, f"top {len(top)}": list(top)},
            execution=QUIET))
        out[at] = {"whole_donor": points["whole donor"][1], "top": points[f"top {len(top)}"][1]}
        if at in ("prompt", "response"):
            exact = _timed(timings, f"positions {at} exact", lambda r=restricted: jaxpatch.sweep(
                r, metric, execution=QUIET))
            top_here = ranking(exact, "size")[:len(top)]
            out[at].update(top_modules=top_here, jaccard_with_everywhere=_jaccard(top_here, top))
    return out


def _jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b)) if a or b else 1.0


def study_instruction(pair: InstructPair, name: str, s: StudySettings, figures: dict[str, bytes],
                      dw: dict[str, list[str]], second: InstructPair | None = None,
                      dw_second: list[str] | None = None) -> dict[str, Any]:
    """Everything the study measures for one instruction (see the module docstring); `dw` is
    |dW|'s ranking per granularity, `dw_second` the second donor's at module granularity."""
    timings: dict[str, float] = {}
    config = pair.base.config
    score = instruction_prompts(pair, name, 0, s.score_prompts)
    judged = instruction_prompts(pair, name, s.score_prompts, s.judge_prompts)
    batch = make_batch(config, score, "last")
    prepared = prepare(pair.base, pair.donor, batch)
    metric = VectorAnchor(layer=config.n_layers - 1)
    tokenizer = pair.base.tokenizer
    spec = pair.record["instructions"][name]["verifier"]
    judge = TextJudge(spec, verifier_from_spec(spec), judged, s.new_tokens,
                      lambda ids: reply_text(tokenizer, ids))
    base_rate, donor_rate = _timed(timings, "judge endpoints",
                                   lambda: judge.endpoints(prepared, execution=QUIET))
    out: dict[str, Any] = {"judge": {"verifier": spec, "base": base_rate, "donor": donor_rate,
                                     "prompts": len(judged), "new_tokens": s.new_tokens},
                           "granularities": {}}
    extras: dict[str, Any] = {}
    for granularity in GRANULARITIES:
        rankings, extra = _rankings(prepared, metric, granularity, s, dw[granularity], timings)
        extras[granularity] = extra
        directions = _curves(prepared, judge, rankings, granularity, s, timings)
        for direction, drawn in directions.items():
            if drawn["curves"]:
                curves = drawn["curves"]
                figures[f"{name}-{granularity}-{direction}.png"] = faithfulness_png(
                    [c for label, c in curves.items() if not label.startswith("random")],
                    f"{name}: {granularity} granularity, {direction}, judged by generated text",
                    band=[c for label, c in curves.items() if label.startswith("random")])
        out["granularities"][granularity] = {
            "components": len(rankings["|dW|"]),
            "top": {label: order[:s.top] for label, order in rankings.items()},
            "directions": {direction: {
                "whole": drawn["whole"],
                "curves": {label: {k: v for k, v in c.items() if k != "order"}
                           for label, c in drawn["curves"].items()}}
                for direction, drawn in directions.items()},
            **{k: v for k, v in extra.items() if k != "exact_denoise"}}
    out["routing"] = _routing(prepared, metric, extras["neuron"]["neurons"]["shortlist"][:64],
                              extras["head"]["exact_denoise"],
                              extras["neuron"]["neurons"]["exact"], timings)
    top_modules = out["granularities"]["module"]["top"]["exact denoise"]
    out["positions"] = _restricted(pair, batch, judge, metric, top_modules, timings)
    if name in s.hierarchy:
        h = _timed(timings, "hierarchy", lambda: jaxpatch.trace_hierarchy(
            prepared, metric, search=TraceSearch(depth=1, top_targets=8, max_groups=8),
            execution=QUIET))
        graph = h.graph()
        figures[f"{name}-hierarchy.png"] = hierarchy_png(graph, f"{name}: source-level hierarchy")
        out["hierarchy"] = {"roles": {role: h.with_role(role) for role in
                                      ("source", "aggregation", "execution")},
                            "sources_recovery": h.sources_recovery, "graph": graph}
    if second is not None and dw_second is not None:
        other = prepare(second.base, second.donor,
                        make_batch(config, instruction_prompts(second, name, 0, s.score_prompts),
                                   "last"))
        exact2 = _timed(timings, "second donor exact", lambda: jaxpatch.sweep(
            other, metric, execution=QUIET))
        ig2 = _timed(timings, "second donor integrated gradients", lambda: jaxpatch.attribute(
            other, metric, granularity="module", method="integrated-gradients", steps=s.ig_steps,
            execution=QUIET))
        top2, ig_top2 = ranking(exact2, "size")[:s.top], ranking(ig2, "size")[:s.top]
        ig_top = out["granularities"]["module"]["top"]["integrated gradients"]
        out["donors"] = {"top_first": top_modules, "top_second": top2,
                         "ig_top_first": ig_top, "ig_top_second": ig_top2,
                         "jaccard_exact": _jaccard(top_modules, top2),
                         "jaccard_ig": _jaccard(ig_top, ig_top2),
                         "jaccard_dw": _jaccard(dw["module"][:s.top], dw_second[:s.top])}
    out["timing"] = timings
    return out


def study(pair: InstructPair, s: StudySettings, second: InstructPair | None = None,
          log: Callable[[str], None] = print,
          each: Callable[[dict[str, Any], dict[str, bytes]], None] | None = None
          ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The whole study: one record per instruction, and the figures (name -> PNG bytes).

    Arguments:
        pair, s, second: the pair, the settings, a second donor's pair.
        log: where progress lines go.
        each: called with the document so far after each instruction (to keep what is done).
    """
    start = time.perf_counter()
    figures: dict[str, bytes] = {}
    device = jax.devices()[0]
    machine = (f"{device.platform.upper()} ({platform.processor() or platform.machine()}), "
               f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
    document: dict[str, Any] = {
        "format": "jaxpatch.instruct-study/1", "settings": dataclasses.asdict(s),
        "pair": {"folder": pair.folder.name, "record": _pair_summary(pair.record)},
        "second": None if second is None else {"folder": second.folder.name,
                                               "record": _pair_summary(second.record)},
        "machine": machine, "seconds": 0.0, "instructions": {}}
    dw = _dw_rankings(pair)
    dw_second = None if second is None else _dw_rankings(second, ("module",))["module"]
    for name in s.instructions:
        document["instructions"][name] = study_instruction(pair, name, s, figures, dw, second,
                                                           dw_second)
        document["seconds"] = round(time.perf_counter() - start, 1)
        log(f"{name}: done ({document['seconds']:.0f} s)")
        if each is not None:
            each(document, figures)
    return document, figures


def _pair_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("settings", "rates", "held_out_text_loss", "seconds")
            if k in record}


BEST_EXCLUDED = ("|dW|",)


def _margins(curves: dict[str, Any]) -> dict[str, Any]:
    """The best localization method's CPR in one set of curves against |dW|'s and the random
    band's top."""
    methods = {k: c["cpr"] for k, c in curves.items()
               if k not in BEST_EXCLUDED and not k.startswith("random")}
    best = max(methods, key=methods.__getitem__)
    band = [c["cpr"] for k, c in curves.items() if k.startswith("random")]
    return {"best": best, "best_cpr": methods[best], "dw_cpr": curves["|dW|"]["cpr"],
            "margin_over_dw": methods[best] - curves["|dW|"]["cpr"],
            "random_max": max(band) if band else None,
            "above_random": bool(band) and methods[best] > max(band)}


def _half_way(curve: dict[str, Any]) -> int | None:
    """The smallest measured k whose top-k set covers at least half the behavior (f >= 0.5)."""
    return next((k for k, f in zip(curve["sizes"], curve["faithfulness"]) if f >= 0.5), None)


def _why_close(curves: dict[str, Any], best: str) -> str:
    """Why a ranking does not pull ahead of |dW|, read off the curves: where each first covers
    half the behavior, and whether the size ladder can tell them apart there."""
    n = curves["|dW|"]["components"]
    k_best, k_dw = _half_way(curves[best]), _half_way(curves["|dW|"])
    early = [k for k in (_half_way(c) for c in curves.values()) if k is not None]
    if not early:
        return f"No ranking's top k covers half the behavior, not even all {n} together."
    fewest = (f"no ranking (random ones included) does with fewer than {min(early)}"
              if min(early) > 1 else "")
    if k_best is not None and k_best == k_dw:
        sizes = curves["|dW|"]["sizes"]
        below = sizes[sizes.index(k_best) - 1]
        return (f"Both first cover half the behavior at their top {k_best} of {n}"
                + (f", and {fewest}" if fewest else "")
                + f"; between the measured sizes {below} and {k_best} the curves cannot tell "
                "the rankings apart.")

    def at(k: int | None) -> str:
        return f"at its top {k}" if k is not None else "not before all of them"
    return (f"{best} first covers half the behavior {at(k_best)}, |dW| {at(k_dw)} of {n}"
            + (f"; {fewest}" if fewest else "") + ".")


def _drawn(result: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(granularity, direction, curves) for every set of curves one instruction drew."""
    return [(g, d, v["curves"]) for g, r in result["granularities"].items()
            for d, v in r["directions"].items() if v["curves"]]


def _not_drawn(result: dict[str, Any]) -> list[tuple[str, str, float, int]]:
    """(granularity, direction, f of all components, their number) where no curve was drawn."""
    return [(g, d, v["whole"], r["components"]) for g, r in result["granularities"].items()
            for d, v in r["directions"].items() if not v["curves"]]


MOVES = {"denoise": "from the donor into the base recovers", "noise": "from the base into the "
         "donor removes"}


def findings(document: dict[str, Any]) -> list[str]:
    """What the study shows, one sentence per question, from its numbers alone."""
    out = []
    for name, r in document["instructions"].items():
        module = r["granularities"]["module"]["directions"].get("denoise", {}).get("curves")
        sentence = f"**{name}**: "
        if module:
            m = _margins(module)
            sentence += (f"at module granularity (denoise) the best ranking is {m['best']} (CPR "
                         f"{m['best_cpr']:.3f}) against |dW|'s {m['dw_cpr']:.3f}, a margin of "
                         f"{m['margin_over_dw']:+.3f} ("
                         f"{'at least' if m['margin_over_dw'] >= 0.1 else 'short of'} the 0.1 "
                         "asked for). ")
            if m["margin_over_dw"] < 0.1:
                sentence += _why_close(module, m["best"]) + " "
        drawn = _drawn(r)
        above = [f"{g} {d}" for g, d, c in drawn if _margins(c)["above_random"]]
        below = [f"{g} {d}" for g, d, c in drawn if not _margins(c)["above_random"]]
        sentence += (f"The best ranking is above the random band at {', '.join(above) or 'none'}"
                     + (f", not at {', '.join(below)}" if below else "") + " of the curves drawn.")
        sentence += "".join(
            f" Every {g} together ({n}) {MOVES[d]} only f = {f:.2f} of the behavior, so no "
            f"{g} {d} curve is drawn." for g, d, f, n in _not_drawn(r))
        if module and (_margins(module)["random_max"] or 0.0) >= 0.5:
            j = r["judge"]
            sentence += (f" Random rankings recover it early too (random CPR up to "
                         f"{_margins(module)['random_max']:.3f}; the judge's base rate is "
                         f"{j['base']:.2f} and the donor's {j['donor']:.2f}): most perturbations "
                         "of the base already satisfy this verifier in the judged tokens, so "
                         "its curves say little about where the behavior lives.")
        out.append(sentence)
    positions = {name: r["positions"] for name, r in document["instructions"].items()}
    for name, p in positions.items():
        out.append(f"**{name}**: the whole donor at the response positions only recovers "
                   f"{p['response']['whole_donor']:.2f} of the behavior, at the first response "
                   f"token only {p['first-response']['whole_donor']:.2f}, at the prompt only "
                   f"{p['prompt']['whole_donor']:.2f}, at the instruction's tokens only "
                   f"{p['marked']['whole_donor']:.2f}.")
    routing = [(n, r["routing"]) for n, r in document["instructions"].items()]
    holds = [n for n, x in routing if x["holds"]]
    out.append("Heads route, neurons are sources: "
               + ("holds" if len(holds) == len(routing) else
                  f"holds for {', '.join(holds)} only" if holds else "does not hold")
               + " (among components whose activation carries the anchor, the share whose "
               "weights alone recover it: "
               + "; ".join(f"{n}: heads {_share(x['head'])}, neurons {_share(x['neuron'])}"
                           for n, x in routing) + ").")
    overlaps = {n: r["donors"] for n, r in document["instructions"].items() if "donors" in r}
    if overlaps:
        out.append("Two donors: the top-10 modules overlap (Jaccard) by "
                   + ", ".join(f"{n} {d['jaccard_exact']:.2f} by exact denoise, "
                               f"{d['jaccard_ig']:.2f} by integrated gradients"
                               for n, d in overlaps.items())
                   + f"; |dW|'s top 10 of the two donors overlap by "
                   f"{next(iter(overlaps.values()))['jaccard_dw']:.2f}.")
    else:
        out.append("Two donors: only one donor was studied (no `--second`), so the stability "
                   "of the top modules across seeds is not measured here.")
    return out


CHECKS = PairSettings()
"""The issue's checks of a donor are the builder's defaults: it follows each instruction in at
least 90% of held-out replies, the base in at most 20%, and its held-out plain-text loss rises by
at most 0.3 (a donor built with loosened settings is still judged by these)."""


def _shortfalls(record: dict[str, Any]) -> list[str]:
    """What in a donor's build record falls short of `CHECKS`, one phrase each."""
    loss = record["held_out_text_loss"]
    rise = loss["donor"] - loss["base"]
    short = [f"follows {k} in {v:.0%} (below {CHECKS.min_donor_rate:.0%})"
             for k, v in record["rates"]["donor"].items() if v < CHECKS.min_donor_rate]
    short += [f"the base follows {k} in {v:.0%} (above {CHECKS.max_base_rate:.0%})"
              for k, v in record["rates"]["base"].items() if v > CHECKS.max_base_rate]
    if rise > CHECKS.max_text_loss_increase:
        short.append(f"its text loss rises by {rise:.3f} (above {CHECKS.max_text_loss_increase})")
    return short


def _checked(record: dict[str, Any]) -> str:
    """A donor's build record against `CHECKS`, one sentence: its text loss and what fell short."""
    loss = record["held_out_text_loss"]
    short = _shortfalls(record)
    return (f"held-out plain text loss {loss['base']:.3f} -> {loss['donor']:.3f} nats/token "
            f"({loss['donor'] - loss['base']:+.3f}); "
            + ("**misses a check**: " + "; ".join(short) + "." if short else "every check met."))


def _share(row: dict[str, Any]) -> str:
    return "-" if row["share_sources"] is None else f"{row['share_sources']:.0%}"


def _cell(label: str) -> str:
    return label.replace("|", "\\|")


def markdown(document: dict[str, Any]) -> str:
    """The study as a Markdown page (what `docs/instruct_pair.md` holds)."""
    s = document["settings"]
    pair = document["pair"]["record"]
    lines = ["# An instruction-tuned gemma-3-270m: where the format instructions live", "",
             f"Generated by `python -m experiments.instruct_study` on {document['machine']} in "
             f"{document['seconds'] / 60:.0f} minutes. Every number below is in "
             "`docs/instruct_pair.json`."]
    missing = [n for n in s["instructions"] if n not in document["instructions"]]
    if missing:
        lines += ["", f"**Partial**: this run finished {len(document['instructions'])} of the "
                  f"{len(s['instructions'])} instructions it was asked for; not measured: "
                  f"{', '.join(missing)}."]
    lines += ["", "## What this shows", ""]
    lines += [f"- {sentence}" for sentence in findings(document)]
    lines += ["", "## The pair", ""]
    donors = [pair] + ([document["second"]["record"]] if document.get("second") else [])
    heads = [f"donor (seed {d['settings']['seed']}, {d['settings']['steps']} steps)"
             for d in donors]
    if all(d.get("rates") for d in donors):
        lines += ["Followed on held-out questions (greedy, judged by the verifiers), from the "
                  "builds' checks:", "", "| instruction | base | " + " | ".join(heads) + " |",
                  "| --- | --- |" + " --- |" * len(donors)]
        lines += [f"| {k} | {pair['rates']['base'][k]:.0%} | "
                  + " | ".join(f"{d['rates']['donor'][k]:.0%}" for d in donors) + " |"
                  for k in pair["rates"]["donor"]]
        lines.append("")
        for head, d in zip(heads, donors):
            lines.append(f"- {head}: {_checked(d)}")
        lines.append("")
    lines += ["## Faithfulness judged by generated text", "",
              "Denoise: each ranking's top k components from the donor into the base; noise: from "
              "the base into the donor. f is the share of the way from the start model's rate of "
              f"following the instruction to the other model's that the patched model covers "
              f"({s['judge_prompts']} held-out questions, {s['new_tokens']} greedy tokens). CPR "
              "is the area under f over k / n (higher: the ranking's top carries the behavior "
              "sooner). Rankings come from the vector anchor of each instruction (last block, "
              f"last prompt token). A direction's curves are drawn at a granularity only where "
              f"all its components together move at least f = {s['min_whole']} (below, no "
              "ranking's curve can rise).", ""]
    measured = []
    for name, r in document["instructions"].items():
        j = r["judge"]
        drawn = _drawn(r)
        lines += [f"### {name}", "", f"Judge `{j['verifier']}`: base {j['base']:.2f}, donor "
                  f"{j['donor']:.2f}. All components of a granularity together: "
                  + "; ".join(f"{g} {d} f = {v['whole']:.2f}"
                              for g, x in r["granularities"].items()
                              for d, v in x["directions"].items()) + ".", "",
                  "| ranking | " + " | ".join(f"{g} {d} CPR" for g, d, _ in drawn) + " |",
                  "| --- |" + " --- |" * len(drawn)]
        labels: list[str] = []
        for _, _, curves in drawn:
            labels += [k for k in curves if k not in labels]
        for label in labels:
            cells = [f"{c[label]['cpr']:.3f}" if label in c else "-" for _, _, c in drawn]
            lines.append(f"| {_cell(label)} | " + " | ".join(cells) + " |")
        lines.append("")
        for g, d, curves in drawn:
            m = _margins(curves)
            measured.append((name, g, d, m))
            lines.append(f"- {g} {d}: best {_cell(m['best'])} ({m['best_cpr']:.3f}), \\|dW\\| "
                         f"{m['dw_cpr']:.3f} (margin {m['margin_over_dw']:+.3f}), random band "
                         f"up to {m['random_max']:.3f}: "
                         f"{'above' if m['above_random'] else 'not above'} it.")
        top = r["granularities"]["module"]["top"]
        lines += ["", f"Top {s['top']} modules by exact denoise: {', '.join(top['exact denoise'])}; "
                  f"by integrated gradients: {', '.join(top['integrated gradients'])}; "
                  f"by \\|dW\\|: {', '.join(top['|dW|'])}.", ""]
        lines += [f"![{name}, {g} {d}](instruct_pair/{name}-{g}-{d}.png)" for g, d, _ in drawn]
        lines.append("")
    lines += ["## Targets", "", "| target | measured | |", "| --- | --- | --- |"]
    if all(d.get("rates") for d in donors):
        lines.append("| each donor follows every instruction in >= 90% of held-out replies, the "
                     "base in <= 20%, text loss +0.3 at most | "
                     + "; ".join(f"seed {d['settings']['seed']}: "
                                 + (", ".join(_shortfalls(d)) or "all met") for d in donors)
                     + f" | {'missed' if any(_shortfalls(d) for d in donors) else 'met'} |")
    module = [(n, m) for n, g, d, m in measured if (g, d) == ("module", "denoise")]
    met = [n for n, m in module if m["margin_over_dw"] >= 0.1]
    lines.append("| best method >= \\|dW\\| + 0.1 CPR at module granularity (capitals and 2 more) | "
                 + ", ".join(f"{n} {m['margin_over_dw']:+.3f}" for n, m in module)
                 + f" | {'met' if 'capitals' in met and len(met) >= 3 else 'missed'} |")
    undrawn = [(n, g, d) for n, r in document["instructions"].items()
               for g, d, _, _ in _not_drawn(r)]
    above = all(m["above_random"] for *_, m in measured) and not undrawn
    lines.append("| best method above the random band at every granularity | "
                 + ", ".join(f"{n}/{g}/{d} {'yes' if m['above_random'] else 'no'}"
                             for n, g, d, m in measured)
                 + "".join(f", {n}/{g}/{d} not drawn" for n, g, d in undrawn)
                 + f" | {'met' if above else 'missed'} |")
    overlaps = {n: r["donors"] for n, r in document["instructions"].items() if "donors" in r}
    stable = bool(overlaps) and min(d["jaccard_ig"] for d in overlaps.values()) >= 0.5
    lines.append("| top-10 modules of two donors by integrated gradients, Jaccard >= 0.5 | "
                 + (", ".join(f"{n} {d['jaccard_ig']:.2f} (exact denoise: {d['jaccard_exact']:.2f})"
                              for n, d in overlaps.items()) or "no second donor")
                 + f" | {'met' if stable else 'missed'} |")
    lines += ["", "## Heads route, neurons are sources?", "",
              "Among components whose output activation carries at least 0.05 of the anchor "
              "(activation patching), the share whose own weights recover at least half of that "
              "(weight patching): sources; the rest pass on what they receive.", "",
              "| instruction | heads carrying | heads that are sources | neurons carrying | "
              "neurons that are sources | holds |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in document["instructions"].items():
        h, n = r["routing"]["head"], r["routing"]["neuron"]
        lines.append(f"| {name} | {h['carrying']} | {_share(h)} | {n['carrying']} | {_share(n)} | "
                     f"{'yes' if r['routing']['holds'] else 'no'} |")
    lines += ["", "## Position-restricted patches", "",
              "The whole donor, and the exact ranking's top modules, patched only at some token "
              "positions (f judged by generated text as above): the prompt before its last token, "
              "the response (the last prompt token and every generated token), the first response "
              "token alone, the instruction's own tokens.", "",
              "| instruction | " + " | ".join(PATCH_AT) + " |",
              "| --- |" + " --- |" * len(PATCH_AT)]
    for name, r in document["instructions"].items():
        p = r["positions"]
        lines.append(f"| {name} (whole donor) | "
                     + " | ".join(f"{p[at]['whole_donor']:.2f}" for at in PATCH_AT) + " |")
        lines.append(f"| {name} (top {s['top']}) | "
                     + " | ".join(f"{p[at]['top']:.2f}" for at in PATCH_AT) + " |")
    lines += ["", f"The exact module ranking (vector anchor) with patches at one half of the "
              f"sequence only, its top {s['top']} against the unrestricted ranking's (Jaccard):", ""]
    for name, r in document["instructions"].items():
        p = r["positions"]
        lines.append(f"- {name}: prompt only {p['prompt']['jaccard_with_everywhere']:.2f} "
                     f"({', '.join(p['prompt']['top_modules'][:5])}, ...); response only "
                     f"{p['response']['jaccard_with_everywhere']:.2f} "
                     f"({', '.join(p['response']['top_modules'][:5])}, ...).")
    hierarchy = {n: r["hierarchy"] for n, r in document["instructions"].items() if "hierarchy" in r}
    if hierarchy:
        lines += ["", "## The hierarchy", ""]
        for name, h in hierarchy.items():
            lines += [f"{name}: sources {', '.join(h['roles']['source']) or 'none'} (together "
                      f"{h['sources_recovery']:.2f} of the anchor); aggregation "
                      f"{len(h['roles']['aggregation'])} components; execution "
                      f"{len(h['roles']['execution'])}.", "",
                      f"![{name} hierarchy](instruct_pair/{name}-hierarchy.png)", ""]
    timing = {n: sum(r["timing"].values()) for n, r in document["instructions"].items()}
    lines += ["## Time", "", "Seconds per instruction (every step's time is in the JSON): "
              + ", ".join(f"{n} {t:.0f}" for n, t in timing.items()) + "."]
    return "\n".join(lines) + "\n"


def write(document: dict[str, Any], figures: dict[str, bytes], out: str | Path) -> None:
    """Writes the JSON, the page and the figures into `out` (each file atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out / "instruct_pair", overwrite=True) as tmp:
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
    for name, text in (("instruct_pair.json", json.dumps(document, indent=1) + "\n"),
                       ("instruct_pair.md", markdown(document))):
        part = out / f".{name}.part"
        part.write_text(text)
        part.replace(out / name)


def main(argv: Sequence[str] | None = None) -> int:
    """The study's command (`python -m experiments.instruct_study --help`)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.instruct_study",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--pair", default=str(default_out(0)), help="the pair (default: seed 0's "
                        "in the user cache)")
    parser.add_argument("--second", help="a second donor's pair (another seed), for the overlap")
    parser.add_argument("--out", default="docs", help="folder for the page, JSON and figures")
    parser.add_argument("--instructions", help="comma-separated (default: "
                        + ",".join(StudySettings.instructions) + ")")
    args = parser.parse_args(argv)
    settings = StudySettings()
    if args.instructions:
        settings = dataclasses.replace(settings, instructions=tuple(args.instructions.split(",")))
    try:
        pair = load_pair(args.pair)
        second = load_pair(args.second) if args.second else None
        document, _ = study(pair, settings, second,
                            each=lambda d, f: write(d, f, args.out))
    except JaxpatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
