"""Chat templates: prompts given as chat messages, rendered the way the model's tokenizer does.

An instruction-tuned model is measured fairly only on prompts in its own chat format. A model's
template is the Jinja text in its checkpoint (`chat_template.jinja`, else `chat_template` in
`tokenizer_config.json`); it is rendered here as transformers' `apply_chat_template` renders it:
a sandboxed, immutable Jinja environment (a template from a downloaded repository is untrusted
input) with `trim_blocks`, `lstrip_blocks` and loop controls, the special tokens of
`tokenizer_config.json` as variables (`bos_token`, `eos_token`, ...), the functions
`raise_exception` and `strftime_now`, a `tojson` filter that does not escape HTML, and the
`{% generation %}` tag; the text is then tokenized without adding special tokens (the template
writes them). So the token ids equal `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` (golden fixtures from transformers in the tests).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpatch.errors import CorruptCheckpointError, InvalidInputError

__all__ = ["CHAT_TEMPLATE_FILE", "TOKENIZER_CONFIG_FILE", "SPECIAL_TOKEN_NAMES", "ChatTemplate",
           "read_chat_template", "read_chat_template_config", "chat_template_from_file",
           "write_chat_template"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_MAX_TEMPLATE_BYTES = 1024**2


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template with the special tokens it may name.

    Attributes:
        source: the Jinja text.
        special_tokens: `(name, token)` pairs (`bos_token`, `eos_token`, ...,
            `additional_special_tokens` as a tuple), as `tokenizer_config.json` gives them.
        origin: the file it was read from (for messages and records).

    Example:
        >>> t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        ...                  "{% if add_generation_prompt %}<assistant>{% endif %}")
        >>> t.render([{"role": "user", "content": "hi"}])
        '<user>hi<assistant>'
    """

    source: str
    special_tokens: tuple[tuple[str, Any], ...] = ()
    origin: str = "chat template"

    @property
    def sha256(self) -> str:
        """A SHA-256 of the template and its special tokens (what a run records)."""
        text = json.dumps([self.source, [list(p) for p in self.special_tokens]], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The conversation as text, as transformers' `apply_chat_template(tokenize=False)`.

        Arguments:
            messages: `{"role": ..., "content": ...}` dicts.
            add_generation_prompt: end with the header of the assistant's turn.
            **variables: template variables (`enable_thinking=False`, `date_string=...`);
                they override the special tokens of the same name.

        Returns:
            The rendered text.

        Raises:
            InvalidInputError: the template refuses the conversation (its `raise_exception`),
                or fails (naming the template's file).
        """
        import jinja2

        template = _compiled(self.source, self.origin)
        data = {**{name: _plain(token) for name, token in self.special_tokens},
                **_plain(variables)}
        try:
            return template.render(messages=_plain(list(messages)), tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **data)
        except jinja2.TemplateError as e:
            raise InvalidInputError(f"{self.origin}: the chat template refuses the conversation: "
                                    f"{e.message or type(e).__name__}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise InvalidInputError(f"{self.origin}: the chat template failed on the conversation "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None

    def token_ids(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                  **variables: Any) -> tuple[int, ...]:
        """The conversation's token ids with the generation prompt, as transformers'
        `apply_chat_template(messages, add_generation_prompt=True)` (the text tokenized
        without added special tokens: the template writes them).

        Arguments:
            tokenizer: the model's `tokenizers.Tokenizer`.
            messages: the conversation.
            **variables: template variables (see `render`).

        Returns:
            The token ids.

        Example:
            >>> from tokenizers import Tokenizer, models
            >>> tok = Tokenizer(models.WordLevel({"<user>": 0, "hi": 1, "<assistant>": 2}, "hi"))
            >>> _ = tok.add_special_tokens(["<user>", "<assistant>"])
            >>> t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            ...                  "{% if add_generation_prompt %}<assistant>{% endif %}")
            >>> t.token_ids(tok, [{"role": "user", "content": "hi"}])
            (0, 1, 2)
        """
        text = self.render(messages, add_generation_prompt=True, **variables)
        return tuple(tokenizer.encode(text, add_special_tokens=False).ids)


@functools.lru_cache(maxsize=16)
def _compiled(source: str, origin: str) -> Any:
    """The template compiled in transformers' environment (once per template text)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: marks the assistant's text for training
        masks in transformers; rendering keeps its body unchanged."""

        tags = {"generation"}  # noqa: RUF012  (jinja reads it as a class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` refusing underscore attributes (no way into Python's internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template may not set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=dict, namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidInputError(f"{origin}: the chat template is not valid Jinja (line {e.lineno}: "
                                f"{e.message})") from None


def _plain(value: Any) -> Any:
    """A copy made of JSON types only (what a template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) as the base type
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


def read_chat_template(folder: str | os.PathLike[str]) -> ChatTemplate | None:
    """The chat template of a checkpoint folder: `chat_template.jinja`, else `chat_template` in
    `tokenizer_config.json` (a string, or named templates of which `default` is used), with the
    special tokens `tokenizer_config.json` names; None when the folder has no template.

    Raises:
        CorruptCheckpointError: a malformed `tokenizer_config.json` or template file.

    Example:
        >>> read_chat_template(fixtures / "gpt2") is None
        True
    """
    folder = Path(folder)
    jinja_file = folder / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        special = _special_tokens(_tokenizer_config(folder / TOKENIZER_CONFIG_FILE))
        return ChatTemplate(_read_text(jinja_file), special, str(jinja_file))
    return read_chat_template_config(folder / TOKENIZER_CONFIG_FILE)


def chat_template_from_file(path: str | os.PathLike[str]) -> ChatTemplate:
    """A chat template named on the command line: a `.jinja` file, a `tokenizer_config.json`,
    or a checkpoint folder.

    Raises:
        InvalidInputError: no such file, or no template in it.

    Example:
        >>> p = tmp / "t.jinja"
        >>> _ = p.write_text("{{ messages[0].content }}")
        >>> chat_template_from_file(p).render([{"role": "user", "content": "x"}])
        'x'
    """
    path = Path(path)
    if path.is_dir():
        template = read_chat_template(path)
    elif path.is_file() and path.suffix == ".json":
        template = read_chat_template_config(path)
    elif path.is_file():
        template = ChatTemplate(_read_text(path), (), str(path))
    else:
        raise InvalidInputError(f"{path}: chat template file not found")
    if template is None:
        raise InvalidInputError(f"{path}: holds no chat template")
    return template


def read_chat_template_config(path: Path) -> ChatTemplate | None:
    """The template and special tokens of one `tokenizer_config.json` file (None when it has no
    template, or there is no such file).

    Example:
        >>> read_chat_template_config(tmp / "tokenizer_config.json") is None
        True
    """
    config = _tokenizer_config(path)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise CorruptCheckpointError(f"{path}: chat_template must be a string")
    return ChatTemplate(source, _special_tokens(config), str(path))


def write_chat_template(template: ChatTemplate, folder: Path) -> None:
    """Writes a template as transformers saves one: `chat_template.jinja`, with the special
    tokens in `tokenizer_config.json` (read back by `read_chat_template`).

    Example:
        >>> write_chat_template(ChatTemplate("{{ bos_token }}", (("bos_token", "<s>"),)), tmp)
        >>> read_chat_template(tmp).render([])
        '<s>'
    """
    (folder / CHAT_TEMPLATE_FILE).write_text(template.source)
    config = {name: list(token) if isinstance(token, tuple) else token
              for name, token in template.special_tokens}
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path}: not a JSON object")
    return config


def _special_tokens(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The special tokens a tokenizer config names (`{"content": ...}` objects read as their
    text), as transformers passes them to a template."""
    def text(value: Any) -> str | None:
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    out: list[tuple[str, Any]] = [(name, text(config.get(name))) for name in SPECIAL_TOKEN_NAMES]
    out = [(name, value) for name, value in out if value is not None]
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        tokens = tuple(t for t in (text(v) for v in extra) if t is not None)
        if tokens:
            out.append(("additional_special_tokens", tokens))
    return tuple(out)


def _read_text(path: Path) -> str:
    if path.stat().st_size > _MAX_TEMPLATE_BYTES:
        raise CorruptCheckpointError(f"{path}: {path.stat().st_size} bytes is too large for a "
                                     "tokenizer settings file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: not UTF-8 text ({e.reason})") from None
