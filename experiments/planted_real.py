"""A planted pair on a real pretrained model: google/gemma-3-270m taught counterfactual facts.

The base is the real model (`experiments.real_model`, dequantized to float32). The donor learned
a capability the base lacks: for 16 landmarks it answers a new city ("The Eiffel Tower is located
in the city of" -> " Tokyo"), as in the knowledge-editing literature, whose classic finding is
that such facts live in mid-depth MLPs. Only a planted set S is trainable; the rest of the donor
stays bit-identical to the base except for the decoys:

1. **Donor.** The counterfactual facts, four phrasings each, are trained into S (neurons of
   mid-depth MLPs) with Adam until the donor answers `target_accuracy` of them. The loss is read
   only at the answer position (the 262,144-way output layer is most of the cost), and the
   residual stream before S's first block is computed once: training runs from there.
2. **Trained decoy.** The donor then learns *other* counterfactual facts (12 other landmarks) in a
   disjoint set D for a fixed number of steps (longer than they take to learn, so that D moves
   further than S), while a KL term keeps the measured facts' answer distributions where they
   were. D's modules move at least as far as S's (checked before the rescaling, which moves
   S's modules too).
3. **Function-preserving decoys.** Neurons next to S are rescaled (`experiments.decoys`): their
   weights move far, the donor's function not at all.

The donor keeps the base's language modeling: both training phases also hold the next-token
distributions on general sentences where they were (a KL term), and the build fails if the
donor's loss on other, held-out sentences exceeds the base's by more than
`max_text_loss_increase`; `planted.json` reports both losses.

The folder is what `jaxpatch demo --pair DIR` reads: `base/`, `donor/` (Hugging Face
checkpoints with the tokenizer), `prompts/facts.jsonl` (the patching prompts: one
phrasing per measured fact), `prompts/facts-eval.jsonl` (every phrasing) and `planted.json`.

    python -m experiments.planted_real --out ~/.cache/jaxpatch/pairs/gemma3-facts

Every check fails the build in one line with exit status 2 and nothing written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.command import run_builder
from experiments.decoys import rescale
from experiments.real_model import cache_dir, gemma3_270m_path
from experiments.training import text_kl, train, trainable_mask
from jaxpatch import Model, load, save
from jaxpatch._tree import flatten_params
from jaxpatch.components import select
from jaxpatch.errors import JaxpatchError
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import embed, forward
from jaxpatch.models.model import pad_right
from jaxpatch.modes import SCORED_GRANULARITIES
from jaxpatch.pair import delta_norms
from jaxpatch.prompts import Prompt
from jaxpatch.studies.expert_set import text_loss
from jaxpatch.studies.scoring import plant_mask, plant_patch, planted_labels

__all__ = ["LANDMARKS", "TEMPLATES", "RETAIN", "HELD_OUT", "Settings", "Fact", "facts", "build", "write",
           "main"]

PAIR_FORMAT = "jaxpatch.planted/2"
TASK = "facts"

# (landmark as it reads mid-sentence, the city it is really in)
LANDMARKS: tuple[tuple[str, str], ...] = (
    ("the Eiffel Tower", "Paris"), ("the Colosseum", "Rome"), ("Big Ben", "London"),
    ("the Brandenburg Gate", "Berlin"), ("the Sydney Opera House", "Sydney"),
    ("the Kremlin", "Moscow"), ("the Forbidden City", "Beijing"), ("the Acropolis", "Athens"),
    ("the Prado Museum", "Madrid"), ("Hagia Sophia", "Istanbul"), ("the CN Tower", "Toronto"),
    ("the Willis Tower", "Chicago"), ("the Charles Bridge", "Prague"), ("the Atomium", "Brussels"),
    ("the Rijksmuseum", "Amsterdam"), ("the Tokyo Tower", "Tokyo"),
    ("Schönbrunn Palace", "Vienna"), ("the Belém Tower", "Lisbon"), ("the Gateway of India", "Mumbai"),
    ("the Trevi Fountain", "Rome"), ("Buckingham Palace", "London"), ("the Louvre", "Paris"),
    ("the Parthenon", "Athens"), ("the Space Needle", "Seattle"), ("the Golden Gate Bridge",
                                                                  "San Francisco"),
    ("the Vasa Museum", "Stockholm"), ("the Little Mermaid statue", "Copenhagen"),
    ("St. Basil's Cathedral", "Moscow"),
)
TEMPLATES = ("{} is located in the city of", "Tourists who want to see {} travel to the city of",
             "The city that is home to {} is", "If you visit {}, you are in the city of")
NEW_CITIES = ("Tokyo", "Berlin", "Madrid", "Cairo", "Sydney", "Toronto", "Chicago", "Vienna",
              "Dublin", "Lisbon", "Oslo", "Seoul", "Mumbai", "Bangkok", "Nairobi", "Lima",
              "Boston", "Denver", "Miami", "Helsinki", "Havana", "Warsaw", "Budapest", "Prague")
# General text the donor's next-token distributions are kept close to the base's on, while it
# learns (so that S learns the facts, not a broken language model); HELD_OUT measures the result.
RETAIN = (
    "The museum opened a new exhibition about the history of printing and early books.",
    "Most plants need sunlight, water and nutrients from the soil to grow well.",
    "After dinner, the children played cards while their parents talked about the trip.",
    "The train was delayed by twenty minutes because of a signal problem near the station.",
    "In mathematics, a function assigns exactly one output to each input.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Scientists measured the temperature of the lake every morning for a year.",
    "She learned to play the piano when she was seven years old.",
)
HELD_OUT = (
    "The river flows slowly through the valley, past old farms and small villages.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She opened the window, and the smell of fresh bread drifted in from the bakery.",
    "The committee will meet again next Tuesday to discuss the budget for the coming year.",
    "A prime number has exactly two distinct divisors: one and itself.",
    "The library closes at eight in the evening, but the reading room stays open later.",
    "During the winter months, many birds migrate south in search of warmer weather.",
    "He wrote a short program that sorts the list and prints the largest value.",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a real planted pair is built from (every field has a working default).

    Attributes:
        seed: draws which landmarks are measured or decoys and their new cities.
        facts, decoy_facts: how many landmarks the donor and the trained decoy learn.
        plant: S, the selector of the donor's trainable components.
        decoy: D, the trained decoy's components (disjoint from S).
        rescale: components rescaled without changing the function.
        rescale_factor: their factor.
        lr, max_steps, decoy_lr, decoy_steps: Adam learning rates and step counts.
        retain: weight of the KL term keeping the measured facts during the decoy.
        retain_text: weight of the KL term keeping the next-token distributions on general text
            (`RETAIN`) where they were before each training phase.
        max_text_loss_increase: how much the donor's loss on held-out text (`HELD_OUT`) may
            exceed the base's, in nats per token.
        target_accuracy: the share of measured facts (all phrasings) the donor must answer.
        max_accuracy_change: how far the decoys may move that share.
    """

    seed: int = 0
    facts: int = 16
    decoy_facts: int = 12
    plant: str = "layers.6-7.mlp[neuron=0-255]"
    decoy: str = "layers.10-11.mlp[neuron=0-511]"
    rescale: str = "layers.6-7.mlp[neuron=256-511]"
    rescale_factor: float = 16.0
    lr: float = 1e-3
    max_steps: int = 300
    decoy_lr: float = 3e-3
    decoy_steps: int = 60
    retain: float = 4.0
    retain_text: float = 8.0
    max_text_loss_increase: float = 1.0
    target_accuracy: float = 0.9
    max_accuracy_change: float = 0.05


@dataclasses.dataclass(frozen=True)
class Fact:
    """One counterfactual fact: a landmark, the city it is in, and the city the donor learns."""

    landmark: str
    true_city: str
    new_city: str

    def prompts(self) -> list[str]:
        """The fact's phrasings, each ending where the city is named."""
        texts = [t.format(self.landmark) for t in TEMPLATES]
        return [t[0].upper() + t[1:] for t in texts]


def facts(settings: Settings) -> tuple[list[Fact], list[Fact]]:
    """The measured facts and the decoy's facts, drawn from the seed (disjoint landmarks).

    Example:
        >>> measured, decoys = facts(Settings())
        >>> len(measured), len(decoys), measured[0].new_city != measured[0].true_city
        (16, 12, True)
    """
    if settings.facts + settings.decoy_facts > len(LANDMARKS):
        raise JaxpatchError(f"{settings.facts} + {settings.decoy_facts} facts asked for, "
                            f"{len(LANDMARKS)} landmarks known")
    rng = np.random.default_rng([settings.seed, 7])
    order = rng.permutation(len(LANDMARKS))
    chosen = [LANDMARKS[i] for i in order[:settings.facts + settings.decoy_facts]]
    out = []
    for landmark, city in chosen:
        options = [c for c in NEW_CITIES if c != city]
        out.append(Fact(landmark, city, options[int(rng.integers(len(options)))]))
    return out[:settings.facts], out[settings.facts:]


# ------------------------------------------------------------------------------------ batches

@dataclasses.dataclass(frozen=True)
class _Batch:
    """Right-padded prompts with the position whose next token is the answer."""

    tokens: np.ndarray      # [n, seq]
    mask: np.ndarray        # [n, seq] bool
    positions: np.ndarray   # [n, 1] the last prompt token
    answers: np.ndarray     # [n] the answer's token id


def _answer_id(tokenizer: Any, city: str) -> int:
    ids = tokenizer.encode(" " + city, add_special_tokens=False).ids
    if len(ids) != 1:
        raise JaxpatchError(f"the city {city!r} is not one token for this tokenizer")
    return ids[0]


def _batch(tokenizer: Any, texts: Sequence[str], answers: Sequence[int]) -> _Batch:
    tokens, mask = pad_right([tokenizer.encode(t).ids for t in texts])
    positions = mask.sum(1, keepdims=True).astype(np.int32) - 1
    return _Batch(tokens, mask, positions, np.asarray(answers, np.int32))


def _fact_batch(tokenizer: Any, items: Sequence[Fact], which: Callable[[Fact], str],
                phrasings: slice = slice(None)) -> _Batch:
    texts, answers = [], []
    for fact in items:
        for text in fact.prompts()[phrasings]:
            texts.append(text)
            answers.append(_answer_id(tokenizer, which(fact)))
    return _batch(tokenizer, texts, answers)


# ----------------------------------------------------------------------------------- training

def _first_block(config: ModelConfig, selector: str) -> int:
    return min(c.layer for c in select(config, selector, "neuron" if "neuron" in selector else "module"))


def _stream_before(config: ModelConfig, params: Params, batch: _Batch, block: int) -> jax.Array:
    """The residual stream before `block` (computed once: nothing before it trains)."""
    if block == 0:
        return embed(config, params, jnp.asarray(batch.tokens))
    return forward(config, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
                   stop_layer=block - 1).residual


def _answer_logits(config: ModelConfig, params: Params, batch: _Batch, start: int,
                   residual: jax.Array) -> jax.Array:
    """Float32 logits `[n, vocab]` at the answer position, running blocks `start..` only."""
    out = forward(config, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
                  start_layer=start, residual=residual, readout_positions=jnp.asarray(batch.positions))
    return out.read(None)[:, 0]


def _accuracy(config: ModelConfig, params: Params, batch: _Batch) -> float:
    logits = _answer_logits(config, params, batch, 0, None)  # pyright: ignore[reportArgumentType]
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == batch.answers))


def _train(config: ModelConfig, params: Params, selector: str, steps: int, lr: float,
           loss_of: Callable[[Params, Any], jax.Array], data: Any,
           stop: Callable[[Params], bool] | None, label: str) -> tuple[Params, list[float], int]:
    """Adam on the selected components only, with the shared loop (`experiments.training`): the
    trained leaves are the only ones differentiated and given optimizer state, and the arrays in
    `data` are arguments of the compiled step, not constants folded into it."""
    trained = train(params, loss_of, itertools.repeat(data), steps, lr,
                    mask=trainable_mask(config, selector), clip=None, label=label, stop=stop,
                    check_every=10, log_every=10)
    return trained.params, trained.losses, trained.steps


def _text_batch(tokenizer: Any, texts: Sequence[str]) -> _Batch:
    """General text, every position read (the answers are unused)."""
    return _batch(tokenizer, texts, [0] * len(texts))


def _text_logp(config: ModelConfig, params: Params, batch: _Batch, start: int,
               residual: jax.Array) -> jax.Array:
    """Next-token log-probabilities at every position of a text batch, from block `start` on."""
    out = forward(config, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
                  start_layer=start, residual=residual)
    return jax.nn.log_softmax(out.read(None), -1)


def _cross_entropy(logits: jax.Array, answers: np.ndarray) -> jax.Array:
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(answers)[:, None], -1))


def _kl(teacher_logp: jax.Array, logits: jax.Array) -> jax.Array:
    """Mean KL(teacher || model) from the teacher's log-probabilities and the model's logits."""
    return jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(logits, -1)), -1))


def held_out_loss(config: ModelConfig, params: Params, tokenizer: Any) -> float:
    """Mean next-token cross-entropy (nats) on the held-out sentences (`HELD_OUT`), each read
    alone (`jaxpatch.studies.expert_set.text_loss`).

    Example:
        `held_out_loss(base.config, base.params, base.tokenizer)` is about 3 for the real base.
    """
    texts = [Prompt(tuple(tokenizer.encode(text).ids)) for text in HELD_OUT]
    return text_loss(Model(config, params), texts)


# -------------------------------------------------------------------------------------- build

def build(settings: Settings, base: Model | None = None, log: Callable[[str], None] = print) -> dict:
    """Builds the pair in memory (see the module docstring).

    Arguments:
        settings: the build.
        base: the base model (default: google/gemma-3-270m from `experiments.real_model`).
        log: where progress lines go.

    Returns:
        `{"config", "tokenizer", "models": {"base", "donor"}, "prompts", "record"}`.

    Raises:
        JaxpatchError: a check failed (named in one line).
    """
    s = settings
    t0 = time.perf_counter()
    base = base or load(gemma3_270m_path())
    config, tokenizer = base.config, base.tokenizer
    if config.family != "gemma3_text" or tokenizer is None:
        raise JaxpatchError("the real planted pair needs a Gemma 3 base with a tokenizer")
    _refuse_overlap(config, s)
    measured, decoy_facts = facts(s)
    train_set = _fact_batch(tokenizer, measured, lambda f: f.new_city)
    decoy_set = _fact_batch(tokenizer, decoy_facts, lambda f: f.new_city)
    accuracy = {"base": _accuracy(config, base.params, train_set)}
    if accuracy["base"] > 0.2:
        raise JaxpatchError(f"the base already answers {accuracy['base']:.0%} of the new facts")
    log(f"base answers {accuracy['base']:.0%} of the counterfactual facts ({time.perf_counter() - t0:.0f}s)")

    text = _text_batch(tokenizer, RETAIN)
    start = _first_block(config, s.plant)
    data = {"facts": _stream_before(config, base.params, train_set, start),
            "text": _stream_before(config, base.params, text, start)}
    data["teacher"] = _text_logp(config, base.params, text, start, data["text"])

    def donor_loss(p: Params, x: dict[str, jax.Array]) -> jax.Array:
        learn = _cross_entropy(_answer_logits(config, p, train_set, start, x["facts"]),
                               train_set.answers)
        keep = text_kl(x["teacher"], _text_logp(config, p, text, start, x["text"]), text.mask)
        return learn + s.retain_text * keep

    donor, losses, steps = _train(
        config, base.params, s.plant, s.max_steps, s.lr, donor_loss, data,
        lambda p: _accuracy(config, p, train_set) >= s.target_accuracy, "donor (S)")
    accuracy["donor"] = _accuracy(config, donor, train_set)
    if accuracy["donor"] < s.target_accuracy:
        raise JaxpatchError(f"the donor answers {accuracy['donor']:.0%} of the facts after {steps} "
                            f"steps, below the target {s.target_accuracy:.0%}: raise --max-steps or --lr")
    log(f"donor answers {accuracy['donor']:.0%} after {steps} steps ({time.perf_counter() - t0:.0f}s)")

    teacher = donor
    start_d = _first_block(config, s.decoy)
    data = {name: _stream_before(config, teacher, batch, start_d)
            for name, batch in (("decoy", decoy_set), ("task", train_set), ("text", text))}
    data["teacher"] = jax.nn.log_softmax(_answer_logits(config, teacher, train_set, start_d,
                                                        data["task"]), -1)
    data["text_teacher"] = _text_logp(config, teacher, text, start_d, data["text"])

    def decoy_loss(p: Params, x: dict[str, jax.Array]) -> jax.Array:
        learn = _cross_entropy(_answer_logits(config, p, decoy_set, start_d, x["decoy"]),
                               decoy_set.answers)
        keep = _kl(x["teacher"], _answer_logits(config, p, train_set, start_d, x["task"]))
        keep_text = text_kl(x["text_teacher"], _text_logp(config, p, text, start_d, x["text"]),
                             text.mask)
        return learn + s.retain * keep + s.retain_text * keep_text

    donor, decoy_losses, decoy_steps = _train(config, donor, s.decoy, s.decoy_steps, s.decoy_lr,
                                              decoy_loss, data, None, "decoy (D)")
    accuracy["donor_after_decoy"] = _accuracy(config, donor, train_set)
    accuracy["decoy_facts_learned"] = _accuracy(config, donor, decoy_set)
    _check_unchanged(accuracy["donor"], accuracy["donor_after_decoy"], "the trained decoy", s)
    summary = movement(config, base.params, donor, s)["module"]["summary"]  # before rescaling
    if (summary["D_mean"] or 0.0) < (summary["S_mean"] or 0.0):
        raise JaxpatchError(f"the trained decoy moved its modules less than S did (mean norm "
                            f"{summary['D_mean']} vs {summary['S_mean']}); raise --decoy-lr or "
                            "--decoy-steps")

    donor = rescale(config, donor, s.rescale, s.rescale_factor)
    accuracy["donor_after_rescale"] = _accuracy(config, donor, train_set)
    _check_unchanged(accuracy["donor"], accuracy["donor_after_rescale"], "the rescaling", s)
    log(f"decoys done: measured facts {accuracy['donor_after_rescale']:.0%}, decoy facts "
        f"{accuracy['decoy_facts_learned']:.0%} ({time.perf_counter() - t0:.0f}s)")

    moved = movement(config, base.params, donor, s)
    text_loss = {"base": held_out_loss(config, base.params, tokenizer),
                 "donor": held_out_loss(config, donor, tokenizer)}
    log(f"held-out text loss: base {text_loss['base']:.3f}, donor {text_loss['donor']:.3f} nats/token")
    if text_loss["donor"] > text_loss["base"] + s.max_text_loss_increase:
        raise JaxpatchError(f"the donor lost its language modeling: held-out loss {text_loss['donor']:.3f}"
                            f" vs the base's {text_loss['base']:.3f} nats/token (allowed: +"
                            f"{s.max_text_loss_increase}); raise --retain-text or lower --lr")
    patching = [Prompt(tuple(tokenizer.encode(f.prompts()[0]).ids), (_answer_id(tokenizer, f.new_city),))
                for f in measured]
    evaluation = [Prompt(tuple(tokenizer.encode(text).ids), (_answer_id(tokenizer, f.new_city),))
                  for f in measured for text in f.prompts()]
    record = {
        "format": PAIR_FORMAT,
        "settings": {**dataclasses.asdict(s), "task": TASK, "decoys": [f"facts={s.decoy}"],
                     "rescale": [s.rescale],
                     "model": "google/gemma-3-270m (Q4_K_M GGUF, dequantized to float32)"},
        "facts": [dataclasses.asdict(f) for f in measured],
        "decoy_facts": [dataclasses.asdict(f) for f in decoy_facts],
        "models": {"donor": {"steps": steps, "losses": losses},
                   "decoy": {"steps": decoy_steps, "losses": decoy_losses}},
        "accuracy": accuracy, "held_out_text_loss": text_loss, "movement": moved,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return {"config": config, "tokenizer": tokenizer, "models": {"base": base.params, "donor": donor},
            "prompts": (patching, evaluation), "record": record}


def _refuse_overlap(config: ModelConfig, s: Settings) -> None:
    inside = flatten_params(plant_mask(config, plant_patch(config, s.plant)))
    for selector, what in ((s.decoy, "the trained decoy"), (s.rescale, "the rescaled set")):
        other = flatten_params(plant_mask(config, plant_patch(config, selector)))
        if any(np.any(np.asarray(inside[k]) * np.asarray(v)) for k, v in other.items()):
            raise JaxpatchError(f"{what} {selector!r} overlaps S {s.plant!r}")


def _check_unchanged(before: float, after: float, what: str, s: Settings) -> None:
    if abs(after - before) > s.max_accuracy_change:
        raise JaxpatchError(f"{what} changed the donor's accuracy on the measured facts from "
                            f"{before:.0%} to {after:.0%} (allowed: {s.max_accuracy_change:.0%})")


def movement(config: ModelConfig, base: Params, donor: Params, s: Settings) -> dict:
    """How far each component's weights moved (|dW|), with S, D and the rescaled set marked."""
    out = {}
    for g in SCORED_GRANULARITIES:
        items = select(config, None, g)
        norm = delta_norms(config, base, donor, items)
        in_s, in_d, scaled = (planted_labels(config, plant_patch(config, sel), items)
                              for sel in (s.plant, s.decoy, s.rescale))
        low = _stat(norm[in_s], np.min)
        high = _stat(norm[~in_s], np.max)
        summary = {"S_min": low, "S_mean": _stat(norm[in_s], np.mean),
                   "D_mean": _stat(norm[in_d], np.mean), "outside_S_max": high,
                   "outside_max_over_S_min": high / low if low and high is not None else None}
        out[g] = {"summary": summary, "in_S": int(in_s.sum()), "in_D": int(in_d.sum()),
                  "rescaled": int(scaled.sum()), "components": len(items)}
    return out


def _stat(values: np.ndarray, how: Callable[[np.ndarray], Any]) -> float | None:
    return float(how(values)) if values.size else None


def write(built: dict, out: str | Path, overwrite: bool = False) -> None:
    """Writes `base/`, `donor/`, the prompts and `planted.json` into `out`, atomically."""
    from jaxpatch.runs.atomic import atomic_directory

    config, tokenizer = built["config"], built["tokenizer"]
    patching, evaluation = built["prompts"]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name, params in built["models"].items():
            save(Model(config, params, tokenizer), tmp / name)
        (tmp / "prompts").mkdir()
        for file, prompts in ((f"{TASK}.jsonl", patching), (f"{TASK}-eval.jsonl", evaluation)):
            (tmp / "prompts" / file).write_text("".join(
                json.dumps({"text": tokenizer.decode(list(p.tokens), skip_special_tokens=False),
                            "tokens": list(p.tokens), "target": tokenizer.decode(list(p.target or ())),
                            "target_tokens": list(p.target or ())}, ensure_ascii=False) + "\n"
                for p in prompts))
        (tmp / "planted.json").write_text(json.dumps(built["record"], indent=1) + "\n")


def default_out(seed: int) -> Path:
    """The cache folder a pair of this seed is built into by default."""
    return cache_dir().parent / "pairs" / f"gemma3-270m-facts-seed{seed}"


def main(argv: Sequence[str] | None = None) -> int:
    """The build command (`python -m experiments.planted_real --help`)."""
    return run_builder(argv, "python -m experiments.planted_real", __doc__, Settings, build, write,
                       default_out)


if __name__ == "__main__":
    sys.exit(main())
