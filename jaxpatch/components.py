"""What is patched: components at four granularities, their order, and selectors.

Granularities and component names (every name is itself a valid selector):

    module   embed_tokens, embed_positions (GPT-2), then for each block i:
             layers.i.input_layernorm, layers.i.self_attn.{q,k,v,o}_proj,
             layers.i.post_attention_layernorm, layers.i.mlp.{gate,up,down}_proj,
             then norm and lm_head (untied only). A module's bias goes with its weight.
             Gemma 3, Qwen3 and OLMo 2 add layers.i.self_attn.{q,k}_norm (before o_proj);
             Gemma 2 and 3 add layers.i.pre_feedforward_layernorm before and
             post_feedforward_layernorm after the MLP (their post_attention_layernorm norms
             attention's output); OLMo 2 has no input_layernorm, and its
             post_attention_layernorm and post_feedforward_layernorm norm what attention and
             the MLP add to the stream.
    head     for each block i: layers.i.self_attn[head=h] (row h of q, column h of o), then
             layers.i.self_attn[kv_head=g] (head g of k and v, shared by query heads
             g*r .. g*r+r-1 where r = n_heads / n_kv_heads).
    neuron   layers.i.mlp[neuron=n]: column n of gate and up (and their biases), row n of down.
    layer    layers.i: the whole block.

Enumeration is in that order: blocks ascending, and within a block in the order listed.

Selector syntax:

    path      dotted segments; a segment is a name, a glob (`*`, `*_proj`), a number or a
              range (`10-12`). A path selects every component whose name starts with it:
              `layers.3` selects all of block 3 at any granularity.
    [k=v]     after a path, keeps components indexed by k (head, kv_head, neuron) in v, a list
              of numbers and ranges: `layers.*.self_attn[head=0,3-5]`.
    a | b     union (`,` also means union); a & b intersection; ~a complement; parentheses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from typing import Iterable, Literal, Sequence, Union, get_args

import numpy as np

from jaxpatch.errors import SelectorError
from jaxpatch.models.config import ModelConfig
from jaxpatch.modes import GRANULARITIES, Granularity, check_mode

__all__ = ["IndexKey", "INDEX_KEYS", "Component", "block_modules", "components", "Selector",
           "SelectorLike", "as_selector", "parse", "select", "names", "activation_sites",
           "component_sites"]

IndexKey = Literal["head", "kv_head", "neuron"]
INDEX_KEYS: tuple[IndexKey, ...] = get_args(IndexKey)


@dataclasses.dataclass(frozen=True)
class Component:
    """One patchable unit.

    Attributes:
        name: canonical name, e.g. `layers.3.self_attn[head=5]`.
        granularity: module, head, neuron or layer.
        path: the dotted path split into segments, e.g. `("layers", "3", "self_attn")`.
        key: the index kind (head, kv_head, neuron) or None.
        index: the index or None.
        layer: the block it lives in; -1 for embeddings, n_layers for the final norm and
            lm_head.
        note: a human note, e.g. which query heads share a kv head.

    Example:
        >>> components(ModelConfig.tiny("llama"), "head")[4].note
        'shared by query heads 0-1'
    """

    name: str
    granularity: Granularity
    path: tuple[str, ...]
    key: IndexKey | None
    index: int | None
    layer: int
    note: str = ""


def _module(name: str, layer: int) -> Component:
    return Component(name, "module", tuple(name.split(".")), None, None, layer)


def block_modules(config: ModelConfig) -> tuple[str, ...]:
    """The module names inside one block, in enumeration order.

    Example:
        >>> block_modules(ModelConfig.tiny("gpt2"))[-2:]
        ('mlp.up_proj', 'mlp.down_proj')
    """
    mlp = tuple(f"mlp.{m}" for m in (("gate_proj", "up_proj", "down_proj") if config.gated_mlp
                                      else ("up_proj", "down_proj")))
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm") if config.qk_norm else ()
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", *qk_norms,
                 "self_attn.o_proj")
    if config.norm_layout == "sandwich":
        return ("input_layernorm", *attention, "post_attention_layernorm",
                "pre_feedforward_layernorm", *mlp, "post_feedforward_layernorm")
    if config.norm_layout == "post":
        return (*attention, "post_attention_layernorm", *mlp, "post_feedforward_layernorm")
    return ("input_layernorm", *attention, "post_attention_layernorm", *mlp)


def components(config: ModelConfig, granularity: Granularity) -> list[Component]:
    """All components of a granularity, in the documented order.

    Arguments:
        config: the architecture.
        granularity: module, head, neuron or layer.

    Returns:
        The components.

    Example:
        >>> [c.name for c in components(ModelConfig.tiny("llama"), "module")][:3]
        ['embed_tokens', 'layers.0.input_layernorm', 'layers.0.self_attn.q_proj']
        >>> len(components(ModelConfig.tiny("llama"), "neuron"))
        128
    """
    check_mode("granularity", granularity, GRANULARITIES, SelectorError)
    return list(_components(config, granularity))


@functools.lru_cache(maxsize=32)
def _components(config: ModelConfig, granularity: Granularity) -> tuple[Component, ...]:
    """`components`, built once per architecture and granularity (they are immutable)."""
    c = config
    out: list[Component] = []
    if granularity == "module":
        out.append(_module("embed_tokens", -1))
        if c.positional == "learned":
            out.append(_module("embed_positions", -1))
    for i in range(c.n_layers):
        prefix = f"layers.{i}"
        if granularity == "module":
            out += [_module(f"{prefix}.{m}", i) for m in block_modules(c)]
        elif granularity == "layer":
            out.append(Component(prefix, "layer", ("layers", str(i)), None, None, i))
        elif granularity == "head":
            path = ("layers", str(i), "self_attn")
            out += [Component(f"{prefix}.self_attn[head={h}]", "head", path, "head", h, i)
                    for h in range(c.n_heads)]
            r = c.queries_per_kv_head
            out += [Component(f"{prefix}.self_attn[kv_head={g}]", "head", path, "kv_head", g, i,
                              f"shared by query heads {g * r}-{g * r + r - 1}" if r > 1
                              else f"used by query head {g}")
                    for g in range(c.n_kv_heads)]
        else:
            path = ("layers", str(i), "mlp")
            out += [Component(f"{prefix}.mlp[neuron={n}]", "neuron", path, "neuron", n, i)
                    for n in range(c.d_ff)]
    if granularity == "module":
        out.append(_module("norm", c.n_layers))
        if not c.tie_embeddings:
            out.append(_module("lm_head", c.n_layers))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Groups:
    """`components(config, granularity)` as runs of components that share a module path and
    index kind: selectors are evaluated once per run, over its indices as an array.

    Attributes:
        runs: per run, its (path, key) and [start, stop) in the component list.
        indices: every component's index (-1 where it has none).
    """

    runs: tuple[tuple[tuple[str, ...], IndexKey | None, int, int], ...]
    indices: np.ndarray


@functools.lru_cache(maxsize=32)
def _groups(config: ModelConfig, granularity: Granularity) -> _Groups:
    items = _components(config, granularity)
    runs: list[tuple[tuple[str, ...], IndexKey | None, int, int]] = []
    for i, c in enumerate(items):
        if runs and runs[-1][:2] == (c.path, c.key) and c.key is not None:
            runs[-1] = (c.path, c.key, runs[-1][2], i + 1)
        else:
            runs.append((c.path, c.key, i, i + 1))
    indices = np.array([-1 if c.index is None else c.index for c in items], np.int64)
    return _Groups(tuple(runs), indices)


# ----------------------------------------------------------------------- activation sites

def activation_sites(config: ModelConfig) -> dict[str, int]:
    """Every site activation patching can edit, with the size of its component axis (1 when
    only the whole output is patched).

    Example:
        >>> sites = activation_sites(ModelConfig.tiny("llama"))
        >>> sites["layers.0.self_attn.heads"], sites["layers.0.self_attn.k_proj"], sites["norm"]
        (4, 2, 1)
    """
    sites = {"embed_tokens": 1}
    if config.positional == "learned":
        sites["embed_positions"] = 1
    for i in range(config.n_layers):
        for module in block_modules(config):
            sites[f"layers.{i}.{module}"] = 1
        sites[f"layers.{i}.self_attn.k_proj"] = config.n_kv_heads
        sites[f"layers.{i}.self_attn.v_proj"] = config.n_kv_heads
        sites[f"layers.{i}.self_attn.heads"] = config.n_heads
        sites[f"layers.{i}.mlp.neurons"] = config.d_ff
    sites["norm"] = 1
    if not config.tie_embeddings:
        sites["lm_head"] = 1
    return sites


def component_sites(config: ModelConfig, component: Component) -> dict[str, int | None]:
    """The sites a component's activation patch sets: site -> index on its axis (None: all).
    A whole block sets what its attention and MLP add to the stream (with sandwich norms, the
    outputs of the post-norms).

    Example:
        >>> from jaxpatch.components import components
        >>> cfg = ModelConfig.tiny("llama")
        >>> component_sites(cfg, components(cfg, "head")[5])
        {'layers.0.self_attn.k_proj': 1, 'layers.0.self_attn.v_proj': 1}
        >>> list(component_sites(cfg, components(cfg, "layer")[1]))
        ['layers.1.self_attn.o_proj', 'layers.1.mlp.down_proj']
    """
    prefix = ".".join(component.path)
    if component.granularity == "module":
        return {component.name: None}
    if component.granularity == "layer":
        if config.output_norms is not None:
            return {f"{prefix}.{name}": None for name in config.output_norms}
        return {f"{prefix}.self_attn.o_proj": None, f"{prefix}.mlp.down_proj": None}
    if component.key == "head":
        return {f"{prefix}.heads": component.index}
    if component.key == "kv_head":
        return {f"{prefix}.k_proj": component.index, f"{prefix}.v_proj": component.index}
    return {f"{prefix}.neurons": component.index}


# ------------------------------------------------------------------------------------ selectors

class Selector:
    """A set of components, composable with `|`, `&` and `~`.

    Example:
        >>> s = parse("layers.0") & ~parse("layers.*.mlp")
        >>> [c.name for c in select(ModelConfig.tiny("gpt2"), s, "module")][:2]
        ['layers.0.input_layernorm', 'layers.0.self_attn.q_proj']
    """

    text: str = ""

    def matches(self, component: Component) -> bool:
        """Whether the selector selects one component."""
        index = np.array([-1 if component.index is None else component.index])
        return bool(self.mask(component.path, component.key, index)[0])

    def mask(self, path: tuple[str, ...], key: IndexKey | None, indices: np.ndarray) -> np.ndarray:
        """Which of the components at `path` with index kind `key` and these indices (-1:
        none) the selector selects, as a boolean array."""
        raise NotImplementedError

    def __or__(self, other: Selector) -> Selector:
        return _Union(as_selector(self), as_selector(other))

    def __and__(self, other: Selector) -> Selector:
        return _Intersection(as_selector(self), as_selector(other))

    def __invert__(self) -> Selector:
        return _Complement(self)

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class _Path(Selector):
    segments: tuple[str, ...]
    key: str | None
    ranges: tuple[tuple[int, int], ...]
    text: str

    def mask(self, path: tuple[str, ...], key: IndexKey | None, indices: np.ndarray) -> np.ndarray:
        if len(self.segments) > len(path) or not all(
                _segment_matches(p, s) for p, s in zip(self.segments, path)):
            return np.zeros(len(indices), bool)
        if self.key is None:
            return np.ones(len(indices), bool)
        hit = np.zeros(len(indices), bool)
        if key == self.key:
            for lo, hi in self.ranges:
                hit |= (indices >= lo) & (indices <= hi)
        return hit


@dataclasses.dataclass(frozen=True)
class _Union(Selector):
    a: Selector
    b: Selector

    def mask(self, path: tuple[str, ...], key: IndexKey | None, indices: np.ndarray) -> np.ndarray:
        return self.a.mask(path, key, indices) | self.b.mask(path, key, indices)

    @property
    def text(self) -> str:  # type: ignore[override]
        return f"({self.a} | {self.b})"


@dataclasses.dataclass(frozen=True)
class _Intersection(Selector):
    a: Selector
    b: Selector

    def mask(self, path: tuple[str, ...], key: IndexKey | None, indices: np.ndarray) -> np.ndarray:
        return self.a.mask(path, key, indices) & self.b.mask(path, key, indices)

    @property
    def text(self) -> str:  # type: ignore[override]
        return f"({self.a} & {self.b})"


@dataclasses.dataclass(frozen=True)
class _Complement(Selector):
    a: Selector

    def mask(self, path: tuple[str, ...], key: IndexKey | None, indices: np.ndarray) -> np.ndarray:
        return ~self.a.mask(path, key, indices)

    @property
    def text(self) -> str:  # type: ignore[override]
        return f"~{self.a}"


_RANGE = re.compile(r"(\d+)-(\d+)")


def _segment_matches(pattern: str, segment: str) -> bool:
    if pattern == "*" or pattern == segment:
        return True
    m = _RANGE.fullmatch(pattern)
    if m and segment.isdigit():
        return int(m.group(1)) <= int(segment) <= int(m.group(2))
    return fnmatch.fnmatchcase(segment, pattern)


SelectorLike = Union[str, Selector, Sequence[str]]


def as_selector(value: SelectorLike) -> Selector:
    """A `Selector` from a string, a `Selector`, or a list of strings (their union).

    Example:
        >>> str(as_selector(["layers.0", "norm"]))
        '(layers.0 | norm)'
    """
    if isinstance(value, Selector):
        return value
    if isinstance(value, str):
        return parse(value)
    items = [as_selector(v) for v in value]
    if not items:
        raise SelectorError("an empty list selects nothing")
    out = items[0]
    for item in items[1:]:
        out = out | item
    return out


def parse(text: str) -> Selector:
    """Parses a selector string (see the module docstring for the syntax).

    Raises:
        SelectorError: naming the offending character and its 1-based position.

    Example:
        >>> parse("layers.*.self_attn[head=3]").matches(components(ModelConfig.tiny("llama"), "head")[3])
        True
    """
    return _Parser(text).parse()


class _Parser:
    _SEGMENT = re.compile(r"[A-Za-z0-9_*\-]+")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> SelectorError:
        if self.pos >= len(self.text):
            return SelectorError(f"selector {self.text!r}: {what} at the end")
        return SelectorError(f"selector {self.text!r}: {what} {self.text[self.pos]!r} at position "
                             f"{self.pos + 1}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> Selector:
        if not self.text.strip():
            raise SelectorError("selector is empty")
        result = self.union()
        if self.peek():
            raise self.fail("unexpected")
        return result

    def union(self) -> Selector:
        result = self.intersection()
        while self.peek() in ("|", ","):
            self.pos += 1
            result = _Union(result, self.intersection())
        return result

    def intersection(self) -> Selector:
        result = self.unary()
        while self.peek() == "&":
            self.pos += 1
            result = _Intersection(result, self.unary())
        return result

    def unary(self) -> Selector:
        char = self.peek()
        if char == "~":
            self.pos += 1
            return _Complement(self.unary())
        if char == "(":
            self.pos += 1
            inner = self.union()
            if self.peek() != ")":
                raise self.fail("expected ')' but found" if self.pos < len(self.text) else "missing ')'")
            self.pos += 1
            return inner
        return self.path()

    def path(self) -> Selector:
        self.skip_space()
        start = self.pos
        segments = [self.segment()]
        while self.pos < len(self.text) and self.text[self.pos] == ".":
            self.pos += 1
            segments.append(self.segment())
        key, ranges = None, ()
        if self.pos < len(self.text) and self.text[self.pos] == "[":
            self.pos += 1
            key, ranges = self.index_filter()
        return _Path(tuple(segments), key, ranges, self.text[start:self.pos])

    def segment(self) -> str:
        m = self._SEGMENT.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a name, '*' or a number, found" if self.pos < len(self.text)
                            else "expected a name")
        self.pos = m.end()
        return m.group()

    def index_filter(self) -> tuple[str, tuple[tuple[int, int], ...]]:
        m = re.compile(r"\s*([a-z_]+)\s*=\s*").match(self.text, self.pos)
        if not m or m.group(1) not in INDEX_KEYS:
            raise self.fail(f"expected one of {', '.join(INDEX_KEYS)} followed by '=', found")
        self.pos = m.end()
        ranges = []
        while True:
            r = re.compile(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*").match(self.text, self.pos)
            if not r:
                raise self.fail("expected a number or a range, found")
            lo, hi = int(r.group(1)), int(r.group(2) or r.group(1))
            if hi < lo:
                raise self.fail(f"range {lo}-{hi} is empty, near")
            ranges.append((lo, hi))
            self.pos = r.end()
            if self.pos < len(self.text) and self.text[self.pos] == ",":
                self.pos += 1
                continue
            if self.pos < len(self.text) and self.text[self.pos] == "]":
                self.pos += 1
                return m.group(1), tuple(ranges)
            raise self.fail("expected ',' or ']', found")


def select(config: ModelConfig, selector: SelectorLike | None,
           granularity: Granularity) -> list[Component]:
    """The components of a granularity that a selector matches, in enumeration order.

    Arguments:
        config: the architecture.
        selector: a selector string, `Selector`, list of strings, or None for all.
        granularity: module, head, neuron or layer.

    Returns:
        The matching components.

    Raises:
        SelectorError: the selector does not parse or matches nothing.

    Example:
        >>> [c.name for c in select(ModelConfig.tiny("llama"), "layers.1.mlp[neuron=2-3]", "neuron")]
        ['layers.1.mlp[neuron=2]', 'layers.1.mlp[neuron=3]']
    """
    check_mode("granularity", granularity, GRANULARITIES, SelectorError)
    everything = _components(config, granularity)
    if selector is None:
        return list(everything)
    sel = as_selector(selector)
    _check_index_ranges(config, sel)
    table = _groups(config, granularity)
    keep = np.concatenate([sel.mask(path, key, table.indices[start:stop])
                           for path, key, start, stop in table.runs])
    chosen = [everything[i] for i in np.flatnonzero(keep)]
    if not chosen:
        raise SelectorError(f"selector {str(sel)!r} matches no component at granularity "
                            f"{granularity!r}{_suggestion(config, sel)}")
    return chosen


_INDEX_GRANULARITY: dict[str, Granularity] = {"head": "head", "kv_head": "head", "neuron": "neuron"}


def _paths(sel: Selector) -> list[_Path]:
    """The path selectors inside a selector expression."""
    if isinstance(sel, _Path):
        return [sel]
    return [p for child in vars(sel).values() if isinstance(child, Selector) for p in _paths(child)]


def _check_index_ranges(config: ModelConfig, sel: Selector) -> None:
    """Refuses an index filter reaching past what a module it names has (`[neuron=0-511]` on a
    128-neuron MLP), as `[head=9]` on 4 heads is: one rule, never silently clipped."""
    for path_sel in _paths(sel):
        if path_sel.key is None or not path_sel.ranges:
            continue
        table = _groups(config, _INDEX_GRANULARITY[path_sel.key])
        for path, key, start, stop in table.runs:
            named = len(path_sel.segments) <= len(path) and all(
                _segment_matches(p, s) for p, s in zip(path_sel.segments, path))
            if named and key == path_sel.key:
                count = int(table.indices[start:stop].max()) + 1
                highest = max(hi for _, hi in path_sel.ranges)
                if highest >= count:
                    raise SelectorError(
                        f"selector {path_sel.text!r}: {key} {highest} is out of range, "
                        f"{'.'.join(path)} has {count} ({key}=0-{count - 1})")


def _suggestion(config: ModelConfig, sel: Selector) -> str:
    """`" (did you mean 'mlp' for 'mpl'?)"` for a word of the selector that names no part of
    this model's components, when a close one exists; else ""."""
    import difflib

    known = {part for c in _components(config, "module") for part in c.path}
    known |= {"head", "kv_head", "neuron"}
    for word in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", str(sel)):
        if word not in known and not any(fnmatch.fnmatchcase(k, word) for k in known):
            close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
            if close:
                return f" (did you mean {close[0]!r} for {word!r}?)"
    return ""


def names(items: Iterable[Component]) -> list[str]:
    """The names of components.

    Example:
        >>> names(components(ModelConfig.tiny("llama"), "layer"))
        ['layers.0', 'layers.1']
    """
    return [c.name for c in items]
