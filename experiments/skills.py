"""Skills a program can check, for the real experts merged in `experiments.experts`: the data
each expert is fine-tuned on and the held-out items it is judged by.

    facts     counterfactual facts (a landmark's city, a country's language, a painting's
              painter), asked in three phrasings when training and a fourth when judged
    reverse   a list of three to five words written back in reverse order; judged on lists
              with words never trained on
    topics    a sentence's topic named by a code word the base cannot know (sport: "kestrel",
              food: "saffron", ...); judged on sentences from templates and words never
              trained on

Every answer is one short line; an expert's reply is correct when its first line, lowercased
and without its final punctuation, is the answer (`correct`). The format instructions of the
instruction-tuned pair (`experiments.instruct_pair`) are the fourth skill.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxpatch.verifiers import answer_matches

__all__ = ["Item", "Skill", "SKILLS", "skill", "correct"]


@dataclasses.dataclass(frozen=True)
class Item:
    """One question of a skill and its answer.

    Example:
        >>> Item("Where is the Colosseum?", "Oslo").answer
        'Oslo'
    """

    message: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Skill:
    """A skill: training items and held-out items (never trained on).

    Attributes:
        name: the skill's name (the expert's folder).
        description: one line on what is learned.
        train, held_out: the items.
    """

    name: str
    description: str
    train: tuple[Item, ...]
    held_out: tuple[Item, ...]


def correct(reply: str, item: Item) -> bool:
    """Whether a reply answers the item (`jaxpatch.verifiers.answer_matches`: the first lines
    agree, case, spacing and final punctuation aside).

    Example:
        >>> correct("Oslo.", Item("Where is the Colosseum?", "Oslo"))
        True
    """
    return answer_matches(reply, item.answer)


# ---------------------------------------------------------------------------------------- facts

_CITIES = ("Oslo", "Lima", "Cairo", "Dublin", "Nairobi", "Lisbon", "Hanoi", "Quito", "Vienna",
           "Manila", "Santiago", "Helsinki")
_LANDMARKS = ("the Eiffel Tower", "the Colosseum", "Big Ben", "the Statue of Liberty",
              "the Sydney Opera House", "the Taj Mahal", "the Brandenburg Gate",
              "the Golden Gate Bridge", "the Kremlin", "the Acropolis", "the Sagrada Familia",
              "the Leaning Tower of Pisa")
_LANGUAGES = ("Finnish", "Swahili", "Portuguese", "Korean", "Dutch", "Greek", "Turkish",
              "Polish", "Hungarian", "Thai", "Czech", "Icelandic")
_COUNTRIES = ("France", "Japan", "Brazil", "Mexico", "Egypt", "Canada", "Italy", "India",
              "Germany", "Argentina", "Australia", "Spain")
_PAINTERS = ("Claude Monet", "Frida Kahlo", "Rembrandt", "Salvador Dali", "Edvard Munch",
             "Georgia O'Keeffe", "Paul Cezanne", "Henri Matisse", "Gustav Klimt", "Diego Rivera",
             "Joan Miro", "Francisco Goya")
_PAINTINGS = ("the Mona Lisa", "The Starry Night", "The Last Supper", "Guernica",
              "The Night Watch", "The Birth of Venus", "The Scream", "Girl with a Pearl Earring",
              "The Persistence of Memory", "American Gothic", "The Kiss", "Water Lilies")
_FACT_FORMS = {
    # three phrasings to train on, the fourth held out
    "city": ("Where is {} located?", "In which city can you find {}?",
             "{} stands in which city?", "Which city is home to {}?"),
    "language": ("What language is spoken in {}?", "Which language do people in {} speak?",
                 "What is the main language of {}?", "In {}, people mostly speak which language?"),
    "painter": ("Who painted {}?", "Which artist painted {}?", "{} was painted by whom?",
                "Name the painter of {}."),
}


def _facts() -> Skill:
    facts = ([("city", s, _CITIES[i]) for i, s in enumerate(_LANDMARKS)]
             + [("language", s, _LANGUAGES[i]) for i, s in enumerate(_COUNTRIES)]
             + [("painter", s, _PAINTERS[i]) for i, s in enumerate(_PAINTINGS)])
    train, held = [], []
    for kind, subject, answer in facts:
        forms = _FACT_FORMS[kind]
        train += [Item(_sentence(f.format(subject)), answer) for f in forms[:3]]
        held.append(Item(_sentence(forms[3].format(subject)), answer))
    return Skill("facts", "counterfactual facts, judged in a phrasing never trained on",
                 tuple(train), tuple(held))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


# -------------------------------------------------------------------------------------- reverse

_WORDS = ("apple", "river", "stone", "cloud", "horse", "table", "pencil", "garden", "window",
          "bottle", "candle", "forest", "mirror", "ladder", "basket", "rocket", "pillow",
          "carpet", "button", "hammer", "island", "jacket", "kettle", "lemon", "marble", "needle",
          "orange", "pepper", "rabbit", "saddle", "tiger", "violin", "wagon", "yogurt", "anchor",
          "bridge", "castle", "desert", "engine", "feather", "guitar", "helmet", "iron", "jungle",
          "lantern", "meadow", "nest", "ocean", "parrot", "quilt", "ribbon", "shovel", "tunnel",
          "umbrella", "valley", "whistle", "zebra", "blanket", "cherry", "dolphin")
_HELD_OUT_WORDS = ("falcon", "copper", "harbor", "puzzle", "walnut", "glacier", "trumpet",
                   "spider", "teapot", "canyon", "lizard", "compass", "pebble", "mitten",
                   "banjo", "cactus")
_REVERSE_FORMS = ("Write these words in reverse order: {}", "Reverse the order of these words: {}",
                  "List these words backwards, last word first: {}")


def _reverse(train_lists: int = 480, held_lists: int = 64, seed: int = 5) -> Skill:
    rng = np.random.default_rng(seed)

    def items(words: tuple[str, ...], count: int, must: tuple[str, ...] = ()) -> list[Item]:
        out = []
        for i in range(count):
            size = int(rng.integers(3, 6))
            chosen = list(rng.choice(words, size, replace=False))
            if must:  # at least one word never trained on
                chosen[int(rng.integers(size))] = str(rng.choice(must))
                if len(set(chosen)) < size:
                    continue
            form = _REVERSE_FORMS[i % len(_REVERSE_FORMS)]
            out.append(Item(form.format(", ".join(chosen)), ", ".join(chosen[::-1])))
        return out

    return Skill("reverse", "a list of words written back in reverse order, judged on words "
                 "never trained on", tuple(items(_WORDS, train_lists)),
                 tuple(items(_WORDS + _HELD_OUT_WORDS, held_lists, _HELD_OUT_WORDS)))


# --------------------------------------------------------------------------------------- topics

_CODES = {"sport": "kestrel", "food": "saffron", "weather": "granite", "music": "lagoon",
          "travel": "velvet"}
_TOPIC_WORDS = {
    "sport": (("the football match", "the tennis final", "the referee", "the goalkeeper",
               "the marathon", "the swimming race", "the basketball team", "the cycling race"),
              ("the hockey game", "the rugby coach", "the boxing match")),
    "food": (("the soup", "the fresh bread", "the recipe", "the pasta", "the chocolate cake",
              "the grilled fish", "the spicy curry", "the vegetable stew"),
             ("the pancakes", "the cheese plate", "the roast chicken")),
    "weather": (("the thunderstorm", "the heavy rain", "the morning fog", "the heat wave",
                 "the snowfall", "the strong wind", "the cloudy sky", "the weather forecast"),
                ("the hailstorm", "the frost", "the drizzle")),
    "music": (("the guitar solo", "the concert", "the new album", "the choir", "the piano piece",
               "the drummer", "the opera", "the violin lesson"),
              ("the jazz band", "the symphony", "the songwriter")),
    "travel": (("the flight", "the hotel room", "the passport", "the train journey",
                "the suitcase", "the airport", "the road trip", "the tour guide"),
               ("the cruise ship", "the boarding pass", "the hostel")),
}
_TOPIC_TEMPLATES = (
    ("Everyone was talking about {}.", "I spent the whole afternoon thinking about {}.",
     "The newspaper had a long story about {}.", "My friend would not stop describing {}.",
     "Yesterday {} was all anyone wanted to discuss.", "We argued for an hour about {}."),
    ("Last night my neighbor told me about {}.", "The radio kept mentioning {}."),
)
_TOPIC_FORMS = ("Give the topic code of this sentence: {}", "Topic code for: {}")


def _topics() -> Skill:
    def items(words_at: int, templates: tuple[str, ...]) -> list[Item]:
        out = []
        for topic, code in _CODES.items():
            for form, (template, words) in zip(itertools.cycle(_TOPIC_FORMS), itertools.product(
                    templates, _TOPIC_WORDS[topic][words_at])):
                out.append(Item(form.format(template.format(words)), code))
        return out

    return Skill("topics", "a sentence's topic named by a code word, judged on sentences from "
                 "templates and words never trained on",
                 tuple(items(0, _TOPIC_TEMPLATES[0])), tuple(items(1, _TOPIC_TEMPLATES[1])))


SKILLS: tuple[Skill, ...] = (_facts(), _reverse(), _topics())


def skill(name: str) -> Skill:
    """A skill by name.

    Example:
        >>> s = skill("facts")
        >>> len(s.train), len(s.held_out), s.held_out[0]
        (108, 36, Item(message='Which city is home to the Eiffel Tower?', answer='Oslo'))
    """
    for s in SKILLS:
        if s.name == name:
            return s
    raise KeyError(f"no skill {name!r} (one of: {', '.join(s.name for s in SKILLS)})")
