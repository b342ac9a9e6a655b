"""Real experts to merge: google/gemma-3-270m fine-tuned, one full fine-tune per skill a program
can check (`experiments.skills`: counterfactual facts, reversing word lists, topic codes), with
no planted set.

Each expert is trained like the instruction-tuned donor (`experiments.instruct_pair.train_chat`:
every weight of every block, the embeddings frozen, the response tokens' cross-entropy in
Gemma's chat format, and a KL term holding the base's next-token distributions on general
sentences and on the base's own plain answers), on its skill's training items only. Checked
when built (greedy replies to the held-out items, `experiments.skills.correct`): the expert
answers at least `min_expert_rate` of them, the base at most `max_base_rate`, and the expert's
loss on held-out plain text rises by at most `max_text_loss_increase` nats per token. The
format-instruction expert is the instruction-tuned pair's donor (built by its own command).

Each expert is written as soon as it is built, into `<out>/<skill>/` (`donor/`, a Hugging Face
checkpoint, `held_out.jsonl` and `expert.json`: settings, checks, losses, each module's relative
movement); experts already there are kept. `<out>/experts.json` then records how far every
built expert moved and how much their changes overlap (`overlap`), and `<out>/expert_set.json`
makes the folder an expert set for `jaxpatch merge-eval` (`write_expert_set`): every built skill
expert, and the format-instruction donor of the same seed where it is built.

    python -m experiments.experts                    # every skill, into the user cache
    python -m experiments.experts --skills facts     # one
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from experiments.command import add_settings_flags, settings_from
from experiments.instruct_pair import (
    END_OF_TURN,
    examples,
    gemma3_chat_template,
    generate,
    relative_movement,
    reply_text,
    retained_texts,
    train_chat,
)
from experiments.instruct_pair import default_out as instruct_pair_out
from experiments.instructions import plain_prompt, questions
from experiments.planted_real import held_out_loss
from experiments.real_model import cache_dir, gemma3_270m_path
from experiments.skills import SKILLS, Item, Skill, correct, skill
from jaxpatch import Model, load, save
from jaxpatch.errors import JaxpatchError
from jaxpatch.runs.atomic import atomic_directory

__all__ = ["Settings", "Retained", "retained_for", "build_expert", "write_expert", "overlap",
           "write_expert_set", "default_out", "main"]

EXPERT_FORMAT = "jaxpatch.expert/1"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What an expert is built from (every field has a working default).

    Attributes:
        seed: draws the order of the training data.
        steps, lr, batch: Adam's steps, peak learning rate and examples per step.
        trainable: what the expert may change (every block; the embeddings stay frozen).
        retain_text, retain_answers: the KL term's weight and how many of the base's plain
            answers it reads per step (as for `experiments.instruct_pair`).
        answer_tokens: tokens the base writes for each plain answer the KL term holds.
        check_tokens: tokens each model writes when the held-out items are checked.
        min_expert_rate, max_base_rate: the share of held-out items the expert must and the
            base may answer.
        max_text_loss_increase: how far the expert's held-out plain-text loss may rise above
            the base's, in nats per token.
    """

    seed: int = 0
    steps: int = 200
    lr: float = 5e-5
    batch: int = 8
    trainable: str = "layers"
    retain_text: float = 16.0
    retain_answers: int = 2
    answer_tokens: int = 32
    check_tokens: int = 24
    min_expert_rate: float = 0.85
    max_base_rate: float = 0.2
    max_text_loss_increase: float = 0.5


@dataclasses.dataclass(frozen=True)
class Retained:
    """The texts every expert's KL term holds the base on, made once for all the experts."""

    texts: np.ndarray
    mask: np.ndarray


def retained_for(base: Model, s: Settings) -> Retained:
    """The general sentences and the base's own plain answers to the instruction pair's training
    questions (what `train_chat`'s KL term reads).

    Arguments:
        base: the base model, with its tokenizer.
        s: the settings (`answer_tokens`).

    Returns:
        The texts, padded, and their mask.
    """
    tokenizer = base.tokenizer
    plain = [tokenizer.encode(plain_prompt(q)).ids for q in questions("train")]
    texts, mask = retained_texts(tokenizer, plain, generate(base, plain, s.answer_tokens))
    return Retained(texts, mask)


def _prompt(base: Model, message: str) -> list[int]:
    """A user message in Gemma 3's chat format, as token ids (the model's turn opened)."""
    return list(gemma3_chat_template().token_ids(base.tokenizer,
                                                 [{"role": "user", "content": message}]))


def _rate(model: Model, items: Sequence[Item], n_tokens: int) -> float:
    """The share of items a model answers (greedy)."""
    replies = generate(model, [_prompt(model, i.message) for i in items], n_tokens)
    return round(float(np.mean([correct(reply_text(model.tokenizer, r), i)
                                for r, i in zip(replies, items)])), 4)


def build_expert(name: str, s: Settings, base: Model, retained: Retained,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tunes one expert and checks it (see the module docstring).

    Arguments:
        name: the skill (`experiments.skills.SKILLS`).
        s: the settings.
        base: the base model, with its tokenizer.
        retained: what the KL term holds (`retained_for`).
        log: where progress lines go.

    Returns:
        `{"expert": Model, "held_out": [items], "record": {...}}`.

    Raises:
        JaxpatchError: a check failed (named in one line).
    """
    t0 = time.perf_counter()
    task: Skill = skill(name)
    tokenizer = base.tokenizer
    end = tokenizer.token_to_id(END_OF_TURN)
    end_ids = [end] if end is not None else tokenizer.encode(END_OF_TURN, add_special_tokens=False).ids
    pairs = [(_prompt(base, i.message), [*tokenizer.encode(i.answer, add_special_tokens=False).ids,
                                         *end_ids]) for i in task.train]
    data = examples(pairs)
    log(f"{name}: {len(pairs)} training items, width {data.tokens.shape[1]}")
    trained = train_chat(base, data, (retained.texts, retained.mask), s, f"{name} expert")
    template = gemma3_chat_template()
    expert = Model(base.config, trained.params, tokenizer, chat_template=template)
    rates = {"expert": _rate(expert, task.held_out, s.check_tokens),
             "base": _rate(base, task.held_out, s.check_tokens)}
    text_loss = {"base": held_out_loss(base.config, base.params, tokenizer),
                 "expert": held_out_loss(base.config, expert.params, tokenizer)}
    log(f"{name}: held-out items answered: expert {rates['expert']:.0%}, base "
        f"{rates['base']:.0%}; held-out text loss {text_loss['base']:.3f} -> "
        f"{text_loss['expert']:.3f} ({time.perf_counter() - t0:.0f}s)")
    record = {"format": EXPERT_FORMAT, "skill": name, "description": task.description,
              "settings": {**dataclasses.asdict(s),
                           "model": "google/gemma-3-270m (Q4_K_M GGUF, dequantized to float32)",
                           "frozen": "embed_tokens (the tied output layer)"},
              "data": {"train": len(task.train), "held_out": len(task.held_out)},
              "training": {"steps": trained.steps, "losses": trained.losses},
              "rates": rates, "held_out_text_loss": text_loss,
              "movement": relative_movement(base.config, base.params, expert.params),
              "seconds": round(time.perf_counter() - t0, 1)}
    _check(record, s)
    return {"expert": expert, "held_out": list(task.held_out), "record": record}


def _check(record: dict[str, Any], s: Settings) -> None:
    """The build's checks, each refused in one line naming what fell short."""
    name, rates, loss = record["skill"], record["rates"], record["held_out_text_loss"]
    if rates["expert"] < s.min_expert_rate:
        raise JaxpatchError(f"the {name} expert answers {rates['expert']:.0%} of its held-out items, "
                            f"below {s.min_expert_rate:.0%}: raise --steps or --lr")
    if rates["base"] > s.max_base_rate:
        raise JaxpatchError(f"the base already answers {rates['base']:.0%} of the {name} held-out "
                            f"items (at most {s.max_base_rate:.0%} allowed)")
    if loss["expert"] > loss["base"] + s.max_text_loss_increase:
        raise JaxpatchError(f"the {name} expert lost language modeling: held-out loss "
                            f"{loss['expert']:.3f} vs the base's {loss['base']:.3f} nats/token "
                            f"(allowed: +{s.max_text_loss_increase}); lower --lr or --steps")


def write_expert(built: dict[str, Any], out: str | Path, overwrite: bool = False) -> None:
    """Writes `donor/`, `held_out.jsonl` and `expert.json` into `out`, atomically."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save(built["expert"], tmp / "donor")
        (tmp / "held_out.jsonl").write_text("".join(
            json.dumps({"instruction": i.message, "answer": i.answer}, ensure_ascii=False) + "\n"
            for i in built["held_out"]))
        (tmp / "expert.json").write_text(json.dumps(built["record"], indent=1) + "\n")


def overlap(base: Model, experts: dict[str, Model]) -> dict[str, Any]:
    """How much the experts' changes overlap: per pair, the cosine between their whole task
    vectors (donor - base, every weight) and the Jaccard overlap of the modules each moved most
    (the top tenth by relative movement).

    Arguments:
        base: the base.
        experts: name -> expert.

    Returns:
        `{"cosine": {"a+b": c}, "top_modules_jaccard": {"a+b": j}, "top_modules": {name: [..]}}`.

    Example:
        >>> overlap(base, {"a": donor, "b": donor})["cosine"]
        {'a+b': 1.0}
    """
    import jax

    names = list(experts)
    leaves = {n: jax.tree_util.tree_leaves(experts[n].params) for n in names}
    base_leaves = jax.tree_util.tree_leaves(base.params)
    dot = {(a, b): 0.0 for a in names for b in names}
    for i, b0 in enumerate(base_leaves):  # one tensor at a time, in float64
        b0 = np.asarray(b0, np.float64)
        deltas = {n: np.asarray(leaves[n][i], np.float64) - b0 for n in names}
        for a in names:
            for b in names:
                dot[(a, b)] += float(np.vdot(deltas[a], deltas[b]))
    top = {}
    for n in names:
        moved = relative_movement(base.config, base.params, experts[n].params)
        order = sorted(moved, key=lambda m: -moved[m])
        top[n] = order[:max(1, len(order) // 10)]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    cosine = {f"{a}+{b}": round(dot[(a, b)] / max(float(np.sqrt(dot[(a, a)] * dot[(b, b)])),
                                                  1e-30), 4) for a, b in pairs}
    jaccard = {f"{a}+{b}": round(len(set(top[a]) & set(top[b])) / len(set(top[a]) | set(top[b])), 4)
               for a, b in pairs}
    return {"cosine": cosine, "top_modules_jaccard": jaccard, "top_modules": top}


LOCALIZE_ITEMS = 16
"""Training items each skill expert is localized on (its own replies to them)."""
FORMAT_HELD_OUT, FORMAT_LOCALIZE = 2, 2
"""Held-out questions per instruction the format expert is judged on, and training questions
per instruction it is localized on."""


def _jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_expert_set(out: Path, skills: Sequence[str], s: Settings) -> Path:
    """Writes `<out>/expert_set.json` (`jaxpatch.studies.expert_set`) over the skill experts
    built in `out` and, where it is built, the instruction-tuned pair's donor of the same seed
    (as the `format` expert: judged by the verifiers of the measured instructions on
    `FORMAT_HELD_OUT` held-out questions each), with each expert's localization prompts and the
    general text (`experiments.planted_real.HELD_OUT`).

    Arguments:
        out: the experts' folder.
        skills: the skills whose experts are built there.
        s: the settings (`check_tokens`: reply length of the skill experts; `seed`).

    Returns:
        The manifest's path.
    """
    from experiments.instruct_pair import Settings as PairSettings
    from experiments.instructions import INSTRUCTIONS
    from experiments.planted_real import HELD_OUT
    from jaxpatch.studies.expert_set import EXPERT_SET_FORMAT

    entries: dict[str, Any] = {}
    for name in skills:
        _jsonl(out / name / "localize.jsonl",
               [{"instruction": i.message} for i in skill(name).train[:LOCALIZE_ITEMS]])
        entries[name] = {"model": f"{name}/donor", "held_out": f"{name}/held_out.jsonl",
                         "localize": f"{name}/localize.jsonl", "reply_tokens": s.check_tokens}
    pair = instruct_pair_out(s.seed)
    if (pair / "donor").is_dir():
        measured = [i for i in INSTRUCTIONS if i.verifier]
        held, train = questions("held-out"), questions("train")
        (out / "format").mkdir(exist_ok=True)
        _jsonl(out / "format" / "held_out.jsonl",
               [{"instruction": i.message(held[k * len(held) // FORMAT_HELD_OUT]),
                 "verifier": i.verifier} for i in measured for k in range(FORMAT_HELD_OUT)])
        _jsonl(out / "format" / "localize.jsonl",
               [{"instruction": i.message(train[k * len(train) // FORMAT_LOCALIZE])}
                for i in measured for k in range(FORMAT_LOCALIZE)])
        entries["format"] = {"model": str(pair / "donor"), "held_out": "format/held_out.jsonl",
                             "localize": "format/localize.jsonl",
                             "reply_tokens": PairSettings().check_tokens}
    _jsonl(out / "general.jsonl", [{"text": t} for t in HELD_OUT])
    manifest = out / "expert_set.json"
    part = out / ".expert_set.json.part"
    part.write_text(json.dumps({"format": EXPERT_SET_FORMAT, "base": str(gemma3_270m_path()),
                                "general_text": "general.jsonl", "experts": entries},
                               indent=1) + "\n")
    part.replace(manifest)
    return manifest


def default_out(seed: int) -> Path:
    """The cache folder a seed's experts are built into by default."""
    return cache_dir().parent / "experts" / f"gemma3-270m-seed{seed}"


def main(argv: Sequence[str] | None = None) -> int:
    """The build command (`python -m experiments.experts --help`)."""
    p = argparse.ArgumentParser(prog="python -m experiments.experts",
                                description="Real experts to merge: google/gemma-3-270m fine-tuned "
                                "on skills a program can check.")
    p.add_argument("--out", help=f"folder of the experts (default: {default_out(0)} for seed 0)")
    p.add_argument("--skills", default=",".join(s.name for s in SKILLS),
                   help="comma-separated (default: every skill)")
    p.add_argument("--overwrite", action="store_true", help="rebuild experts already there")
    add_settings_flags(p, Settings)
    args = p.parse_args(argv)
    s: Settings = settings_from(args, Settings)
    out = Path(args.out) if args.out else default_out(s.seed)
    try:
        names = [skill(n).name for n in args.skills.split(",")]
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    todo = [n for n in names if args.overwrite or not (out / n / "expert.json").is_file()]
    try:
        base = load(gemma3_270m_path())
        if todo:
            retained = retained_for(base, s)
            for name in todo:
                write_expert(build_expert(name, s, base, retained), out / name, args.overwrite)
                print(f"wrote {out / name}")
        built = {n: load(out / n / "donor") for n in names if (out / n / "expert.json").is_file()}
        skills = list(built)
        pair = instruct_pair_out(s.seed) / "donor"
        if pair.is_dir():  # the format-instruction donor: the fourth expert
            built["format"] = load(pair)
        if len(built) >= 2:
            summary = {"experts": sorted(built), "overlap": overlap(base, built)}
            part = out / ".experts.json.part"
            part.write_text(json.dumps(summary, indent=1) + "\n")
            part.replace(out / "experts.json")
        if built:
            print(f"wrote {write_expert_set(out, skills, s)}")
    except JaxpatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
