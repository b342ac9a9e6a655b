"""Behavior judged by what a model writes: verifiers of generated text, in the style of IFEval's
checks, and a judge that scores patched models by them.

A verifier is any function `str -> float` (1.0 satisfied, 0.0 not; or a continuous share, such
as the fraction of capital letters). `TextJudge` generates greedy continuations of its prompts
with each patched model (`jaxpatch.engine.generation`), decodes them, and scores each model as
the mean verifier value over the prompts; normalized, the base scores 0 and the donor 1, as
every metric in jaxpatch. `faithfulness_curve` takes a judge where it takes a metric.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxpatch.engine.generation import generate_under_patches
from jaxpatch.engine.prepared import PreparedPair
from jaxpatch.errors import InvalidInputError
from jaxpatch.modes import Direction
from jaxpatch.patch import Patch
from jaxpatch.prompts import Prompt
from jaxpatch.runs.settings import Execution

__all__ = ["Verifier", "END_OF_TURN_MARKERS", "reply_text", "reply_length", "normalize_answer",
           "answer_matches", "capital_share", "all_capitals", "all_lowercase", "no_commas", "quoted",
           "has_title", "ends_with", "word_count", "sections", "highlighted", "VERIFIER_SPECS",
           "verifier_from_spec", "TextJudge"]

Verifier = Callable[[str], float]


END_OF_TURN_MARKERS = ("<end_of_turn>", "<start_of_turn>", "<eos>", "<|im_end|>", "<|eot_id|>",
                       "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>")
"""Tokens that end a generated chat turn (Gemma, Qwen/ChatML, Llama 3, Phi-3, GPT-2, Llama 2)."""


def reply_length(tokenizer: Any, ids: Sequence[int]) -> int:
    """How many of a generated turn's tokens come before its first end-of-turn token
    (`END_OF_TURN_MARKERS`; all of them when there is none).

    Example:
        >>> from tokenizers import Tokenizer, models
        >>> tok = Tokenizer(models.WordLevel({"HI": 0, "<end_of_turn>": 1, "x": 2}, "x"))
        >>> reply_length(tok, [0, 0, 1, 2]), reply_length(tok, [0, 2])
        (2, 2)
    """
    ends = {i for i in map(tokenizer.token_to_id, END_OF_TURN_MARKERS) if i is not None}
    return next((k for k, token in enumerate(ids) if int(token) in ends), len(ids))


def reply_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """A generated turn as text, up to the end of the turn, stripped (what verifiers judge).

    Example:
        >>> from tokenizers import Tokenizer, models
        >>> tok = Tokenizer(models.WordLevel({"HI": 0, "<end_of_turn>": 1, "x": 2}, "x"))
        >>> reply_text(tok, [0, 1, 2])
        'HI'
    """
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
    for end in END_OF_TURN_MARKERS:
        text = text.split(end)[0]
    return text.strip()


def normalize_answer(text: str) -> str:
    """A short answer as compared: the first line, lowercased, inner spaces collapsed, without
    final punctuation.

    Example:
        >>> normalize_answer("  Stone, River,  apple.\\nmore")
        'stone, river, apple'
    """
    line = re.sub(r"\s+", " ", text.strip().split("\n")[0])
    return re.sub(r"[\s.!]+$", "", line).strip().lower()


def answer_matches(reply: str, answer: str) -> bool:
    """Whether a reply gives the answer (`normalize_answer` of both agree).

    Example:
        >>> answer_matches("Oslo.\\nIt is in Norway.", "oslo"), answer_matches("Lima", "Oslo")
        (True, False)
    """
    return normalize_answer(reply) == normalize_answer(answer)


def _letters(text: str) -> list[str]:
    return [c for c in text if c.isalpha()]


def capital_share(text: str) -> float:
    """The share of letters that are capitals (0 for a text without letters).

    Example:
        >>> capital_share("ABc d")
        0.5
    """
    letters = _letters(text)
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def all_capitals(text: str) -> float:
    """1 when the text has letters and every one is a capital.

    Example:
        >>> all_capitals("HELLO, WORLD"), all_capitals("Hello")
        (1.0, 0.0)
    """
    letters = _letters(text)
    return float(bool(letters) and all(c.isupper() for c in letters))


def all_lowercase(text: str) -> float:
    """1 when the text has letters and none is a capital.

    Example:
        >>> all_lowercase("hello, world"), all_lowercase("Hello")
        (1.0, 0.0)
    """
    letters = _letters(text)
    return float(bool(letters) and not any(c.isupper() for c in letters))


def no_commas(text: str) -> float:
    """1 when the text holds no comma.

    Example:
        >>> no_commas("a b"), no_commas("a, b")
        (1.0, 0.0)
    """
    return float("," not in text)


def quoted(text: str) -> float:
    """1 when the whole text (stripped) is wrapped in double quotation marks.

    Example:
        >>> quoted(' "yes" '), quoted('"yes')
        (1.0, 0.0)
    """
    stripped = text.strip()
    return float(len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"')


def has_title(text: str) -> float:
    """1 when the text holds a title in double angular brackets, `<<like this>>`.

    Example:
        >>> has_title("<<A poem>> roses"), has_title("<<>>")
        (1.0, 0.0)
    """
    return float(re.search(r"<<[^\n<>]+>>", text) is not None)


def ends_with(phrase: str) -> Verifier:
    """A verifier: 1 when the text (stripped) ends with `phrase`.

    Example:
        >>> ends_with("Is there anything else?")("Done. Is there anything else?")
        1.0
    """
    def verify(text: str) -> float:
        return float(text.strip().endswith(phrase))

    return verify


def word_count(at_least: int = 0, at_most: int | None = None) -> Verifier:
    """A verifier: 1 when the text's word count lies in `[at_least, at_most]`.

    Example:
        >>> word_count(at_most=3)("one two three"), word_count(at_least=4)("one two")
        (1.0, 0.0)
    """
    def verify(text: str) -> float:
        n = len(text.split())
        return float(n >= at_least and (at_most is None or n <= at_most))

    return verify


def sections(count: int, marker: str = "SECTION") -> Verifier:
    """A verifier: 1 when the text has at least `count` sections, each starting with
    `marker` and a number (`SECTION 1`).

    Example:
        >>> sections(2)("SECTION 1 a\\nSECTION 2 b"), sections(2)("SECTION 1 a")
        (1.0, 0.0)
    """
    pattern = re.compile(rf"\b{re.escape(marker)}\s+\d+")

    def verify(text: str) -> float:
        return float(len(pattern.findall(text)) >= count)

    return verify


def highlighted(count: int) -> Verifier:
    """A verifier: 1 when at least `count` parts are highlighted in markdown, `*like this*`.

    Example:
        >>> highlighted(2)("*a* and *b*"), highlighted(2)("*a*")
        (1.0, 0.0)
    """
    def verify(text: str) -> float:
        return float(len(re.findall(r"\*[^\n*]+\*", text)) >= count)

    return verify


VERIFIER_SPECS = {
    "capitals": "every letter is a capital letter (1 or 0)",
    "capital-share": "the share of letters that are capitals (continuous)",
    "lowercase": "no letter is a capital letter (1 or 0)",
    "no-commas": "no comma (1 or 0)",
    "quoted": "wrapped in double quotation marks (1 or 0)",
    "title": "holds a title in double angular brackets, <<like this>> (1 or 0)",
    "ends-with:PHRASE": "ends with PHRASE (1 or 0)",
    "words:MIN-MAX": "MIN to MAX words (either may be left out: words:-50, words:10-)",
    "sections:N": "at least N sections marked SECTION 1, SECTION 2, ... (1 or 0)",
    "highlighted:N": "at least N parts highlighted in markdown, *like this* (1 or 0)",
}
"""The verifiers a command line can name (`--judge`), with what each checks."""

_PLAIN: dict[str, Verifier] = {"capitals": all_capitals, "capital-share": capital_share,
                               "lowercase": all_lowercase, "no-commas": no_commas,
                               "quoted": quoted, "title": has_title}


def verifier_from_spec(spec: str) -> Verifier:
    """The verifier a spec names (`VERIFIER_SPECS`).

    Raises:
        InvalidInputError: an unknown name or a malformed argument, in one line.

    Example:
        >>> verifier_from_spec("words:2-3")("two words"), verifier_from_spec("capitals")("Hi")
        (1.0, 0.0)
    """
    name, colon, argument = spec.partition(":")
    if not colon and name in _PLAIN:
        return _PLAIN[name]
    try:
        if name == "ends-with" and argument:
            return ends_with(argument)
        if name == "words" and "-" in argument:
            low, high = argument.split("-", 1)
            return word_count(int(low) if low else 0, int(high) if high else None)
        if name in ("sections", "highlighted") and argument:
            return (sections if name == "sections" else highlighted)(int(argument))
    except ValueError:
        pass
    known = ", ".join(VERIFIER_SPECS)
    raise InvalidInputError(f"verifier {spec!r} is not understood; one of: {known}")


@dataclasses.dataclass(frozen=True, eq=False)  # one judge is one key: its endpoints are kept per pair
class TextJudge:
    """Scores models by what they write: greedy continuations of `prompts`, decoded with
    `decode`, each scored by `verifier`, averaged over the prompts.

    Attributes:
        name: what is judged (recorded with results).
        verifier: `str -> float` (`all_capitals`, `no_commas`, ... or any function).
        prompts: the prompts to continue (the instruction, in the model's chat format).
        n_tokens: tokens generated per prompt.
        decode: token ids -> text (a tokenizer's `decode`).

    Example:
        >>> judge = TextJudge("letters", lambda text: float(len(text) > 0), [Prompt((1, 2))], 3,
        ...                   lambda ids: "x" * len(ids))
        >>> judge.scores(pair, {"mlp": jaxpatch.Patch.from_selector(cfg, "layers.1.mlp")})
        {'mlp': 1.0}
    """

    name: str
    verifier: Verifier
    prompts: Sequence[Prompt]
    n_tokens: int
    decode: Callable[[list[int]], str]

    def scores(self, pair: PreparedPair, patches: Mapping[str, Patch], *,
               direction: Direction = "denoise",
               execution: Execution | None = None) -> dict[str, float]:
        """Each patched model's raw score (the mean verifier value over the prompts).

        Arguments:
            pair: the base/donor pair.
            patches: the candidates (an all-zero patch is the start model itself).
            direction: which way patches move weights.
            execution: `chunk_size` patched models generating at once.

        Returns:
            name -> mean verifier value.
        """
        if not self.prompts:
            raise InvalidInputError(f"the {self.name} judge has no prompts")
        generated = generate_under_patches(pair, patches, self.prompts, self.n_tokens,
                                           direction=direction, execution=execution)
        return {name: float(np.mean([self.verifier(self.decode(list(map(int, row))))
                                     for row in tokens]))
                for name, tokens in generated.items()}

    def endpoints(self, pair: PreparedPair, *, execution: Execution | None = None) -> tuple[float, float]:
        """The base's and the donor's raw scores (recovery's 0 and 1), generated once per pair
        (the pair keeps them: every faithfulness curve judged on it reuses them).

        Raises:
            InvalidInputError: base and donor score the same, so recovery is undefined.

        Example:
            >>> first_token = TextJudge("first token", float, [Prompt((1, 2)), Prompt((3,))], 2,
            ...                         lambda ids: str(ids[0]))
            >>> base_score, donor_score = first_token.endpoints(pair)
            >>> base_score != donor_score
            True
        """
        def score() -> tuple[float, float]:
            empty = Patch.from_components(pair.config, [], label="none")
            raw = self.scores(pair, {"base": empty}, execution=execution)
            raw.update(self.scores(pair, {"donor": empty}, direction="noise", execution=execution))
            if raw["base"] == raw["donor"]:
                raise InvalidInputError(f"base and donor score the same on the {self.name} judge "
                                        f"({raw['base']}): recovery is undefined on these prompts")
            return raw["base"], raw["donor"]

        return pair.judged_endpoints(self, score)

    def describe(self) -> dict[str, Any]:
        """What the judge is, as JSON data.

        Example:
            >>> TextJudge("caps", all_capitals, [Prompt((1,))], 4, str).describe()["n_tokens"]
            4
        """
        return {"name": self.name, "prompts": len(self.prompts), "n_tokens": self.n_tokens}
