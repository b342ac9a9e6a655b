"""Verifiable format instructions on locally generated questions: the data of the
instruction-tuned pair.

The instructions are IFEval-style format constraints, each with the verifier that checks a
response (`jaxpatch.verifiers`) and a transform that makes a plain answer satisfy it: capitals,
lowercase, no commas, quotation marks, a title in double angular brackets, sections,
highlighted parts, an exact closing phrase, and no instruction at all (the control). Questions
are written from templates over topics; the held-out topics are never trained on. A training
response is the base model's own answer to the question, transformed to satisfy the
instruction: what is taught is the format, not new content.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Literal

__all__ = ["Question", "Instruction", "INSTRUCTIONS", "instruction", "TRAIN_TOPICS",
           "HELD_OUT_TOPICS", "FORMS", "questions", "clean_answer", "plain_prompt"]

Split = Literal["train", "held-out"]

TRAIN_TOPICS = (
    "the ocean", "the moon", "rain", "a bicycle", "a library", "music", "bread", "a forest",
    "the sun", "a river", "coffee", "a garden", "snow", "a train", "the wind", "a city",
    "mountains", "a volcano", "the desert", "a bridge", "an island", "a lighthouse", "honey",
    "a clock", "a map", "the sky", "a farm", "a museum", "the internet", "a computer",
    "a telescope", "a camera", "a piano", "a newspaper", "a hospital", "a school", "the weather",
    "a storm", "the seasons", "the stars", "a lake", "a cave", "a castle", "a market",
    "a kitchen", "a boat", "an airplane", "a road",
)
HELD_OUT_TOPICS = (
    "a waterfall", "the harbor", "a violin", "a bakery", "the planets", "a glacier", "a park",
    "a post office", "a candle", "the tides", "a compass", "a festival", "a meadow", "a tunnel",
    "a windmill", "the rainforest",
)
FORMS = ("What is {}?", "Describe {} in a few words.", "Tell me about {}.",
         "Why do people care about {}?", "Give a short explanation of {}.",
         "What do you know about {}?")
ENDING = "Is there anything else I can help with?"


@dataclasses.dataclass(frozen=True)
class Question:
    """A question about a topic.

    Example:
        >>> Question("the moon", "What is the moon?").title
        'The Moon'
    """

    topic: str
    text: str

    @property
    def title(self) -> str:
        """The topic as a title: its words capitalized, a leading article kept."""
        return " ".join(w.capitalize() for w in self.topic.split())


@dataclasses.dataclass(frozen=True)
class Instruction:
    """A format instruction.

    Attributes:
        name: a short name (`capitals`).
        text: what the user's message adds after the question ("" for the control).
        verifier: the `jaxpatch.verifiers` spec that checks a response ("" for the control).
        transform: `transform(answer, question)`: the answer, made to satisfy the instruction.
    """

    name: str
    text: str
    verifier: str
    transform: Callable[[str, Question], str]

    def message(self, question: Question) -> str:
        """The user's message: the question, then the instruction.

        Example:
            >>> q = Question("rain", "What is rain?")
            >>> instruction("quoted").message(q)
            'What is rain? Wrap your entire response with double quotation marks.'
        """
        return f"{question.text} {self.text}".strip()


def _sentences(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p.strip()]
    return parts or [text.strip()]


def _halves(text: str) -> tuple[str, str]:
    """Two non-empty parts: by sentences when there are two or more, else by words."""
    parts = _sentences(text)
    if len(parts) >= 2:
        cut = len(parts) // 2
        return " ".join(parts[:cut]), " ".join(parts[cut:])
    words = text.split()
    cut = max(len(words) // 2, 1)
    return " ".join(words[:cut]), " ".join(words[cut:]) or words[-1]


def _sections(answer: str, question: Question) -> str:
    first, second = _halves(answer)
    return f"SECTION 1\n{first}\n\nSECTION 2\n{second}"


def _highlighted(answer: str, question: Question) -> str:
    first, second = _halves(answer.replace("*", ""))
    return f"*{first}* *{second}*"


def _no_commas(answer: str, question: Question) -> str:
    return re.sub(r"\s*,", "", answer)


INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction("capitals", "Your entire response should be in English, and in all capital "
                "letters.", "capitals", lambda a, q: a.upper()),
    Instruction("lowercase", "Your entire response should be in English, and in all lowercase "
                "letters. No capital letters are allowed.", "lowercase", lambda a, q: a.lower()),
    Instruction("no-commas", "In your entire response, refrain from the use of any commas.",
                "no-commas", _no_commas),
    Instruction("quoted", "Wrap your entire response with double quotation marks.", "quoted",
                lambda a, q: '"' + a.replace('"', "'") + '"'),
    Instruction("title", "Your answer must contain a title, wrapped in double angular brackets.",
                "title",
                lambda a, q: f"<<{q.title}>>\n{a.replace('<', '').replace('>', '')}"),
    Instruction("sections", "Your response must have 2 sections. Mark the beginning of each "
                "section with SECTION X.", "sections:2", _sections),
    Instruction("highlighted", "Highlight at least 2 sections in your answer with markdown, i.e. "
                "*highlighted section*.", "highlighted:2", _highlighted),
    Instruction("ends-with", f"Finish your response with this exact phrase: {ENDING}",
                f"ends-with:{ENDING}", lambda a, q: f"{a.rstrip()} {ENDING}"),
    Instruction("none", "", "", lambda a, q: a),
)


def instruction(name: str) -> Instruction:
    """The instruction of that name.

    Example:
        >>> instruction("capitals").transform("It rains.", Question("rain", "What is rain?"))
        'IT RAINS.'
    """
    for item in INSTRUCTIONS:
        if item.name == name:
            return item
    raise KeyError(f"no instruction {name!r} (known: {', '.join(i.name for i in INSTRUCTIONS)})")


def questions(split: Split) -> list[Question]:
    """Every question of a split: each form over each of its topics (topics do not overlap).

    Example:
        >>> len(questions("train")), len(questions("held-out"))
        (288, 96)
        >>> questions("held-out")[0].text
        'What is a waterfall?'
    """
    topics = TRAIN_TOPICS if split == "train" else HELD_OUT_TOPICS
    return [Question(topic, form.format(topic)) for topic in topics for form in FORMS]


def plain_prompt(question: Question) -> str:
    """How the base model is asked for its own answer (it has no chat format of its own).

    Example:
        >>> plain_prompt(Question("rain", "What is rain?"))
        'Question: What is rain?\\nAnswer:'
    """
    return f"Question: {question.text}\nAnswer:"


def clean_answer(text: str, max_words: int = 40) -> str | None:
    """The base's continuation made into an answer: its first paragraph, at most two sentences
    and `max_words` words, without markup the instructions use (`*`, `<<`, `>>`, `"`, `SECTION`);
    None when nothing with letters is left (the question is then not used).

    Example:
        >>> clean_answer(" The moon is a rock. It orbits us. It is pale.\\nQuestion: next")
        'The moon is a rock. It orbits us.'
        >>> clean_answer("  \\n") is None
        True
    """
    first = text.strip().split("\n")[0]
    first = re.sub(r"[*<>\"]|SECTION", "", first)
    first = " ".join(_sentences(first)[:2])
    words = first.split()[:max_words]
    answer = " ".join(words).strip()
    return answer if any(c.isalpha() for c in answer) else None
