"""Components, their order, and selectors (with property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpatch import ModelConfig, SelectorError, components, parse, select
from jaxpatch.components import as_selector, names
from jaxpatch.modes import GRANULARITIES

LLAMA = ModelConfig.tiny("llama")  # 2 layers, 4 heads, 2 kv heads, d_ff 64, untied
GPT2 = ModelConfig.tiny("gpt2")


def test_module_enumeration_order() -> None:
    got = names(components(LLAMA, "module"))
    block = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj"]
    assert got == ["embed_tokens", *[f"layers.{i}.{m}" for i in range(2) for m in block],
                   "norm", "lm_head"]
    gpt2 = names(components(GPT2, "module"))
    assert gpt2[:2] == ["embed_tokens", "embed_positions"] and "lm_head" not in gpt2
    assert "layers.0.mlp.gate_proj" not in gpt2


def test_head_neuron_layer_enumeration() -> None:
    heads = components(LLAMA, "head")
    assert names(heads)[:6] == [*(f"layers.0.self_attn[head={h}]" for h in range(4)),
                                "layers.0.self_attn[kv_head=0]", "layers.0.self_attn[kv_head=1]"]
    assert heads[5].note == "shared by query heads 2-3"
    assert len(components(LLAMA, "neuron")) == 2 * 64
    assert names(components(LLAMA, "layer")) == ["layers.0", "layers.1"]
    assert [c.layer for c in components(LLAMA, "module")][:2] == [-1, 0]


@pytest.mark.parametrize("text, expected", [
    ("layers.1.mlp.down_proj", ["layers.1.mlp.down_proj"]),
    ("layers.0-1.self_attn.q_proj", ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]),
    ("layers.*.mlp.*_proj & layers.1", ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj",
                                       "layers.1.mlp.down_proj"]),
    ("norm | lm_head", ["norm", "lm_head"]),
    ("embed_tokens, norm", ["embed_tokens", "norm"]),
    ("~layers", ["embed_tokens", "norm", "lm_head"]),
    ("(layers.0 | norm) & ~layers.0.*.*_proj & ~layers.0.*layernorm", ["norm"]),
])
def test_module_selectors(text: str, expected: list[str]) -> None:
    assert names(select(LLAMA, text, "module")) == expected


def test_indexed_selectors() -> None:
    assert names(select(LLAMA, "layers.*.self_attn[head=3]", "head")) == [
        "layers.0.self_attn[head=3]", "layers.1.self_attn[head=3]"]
    assert len(select(LLAMA, "layers.1.mlp[neuron=0-9, 20]", "neuron")) == 11
    assert names(select(LLAMA, "layers.0.self_attn[kv_head=1]", "head")) == ["layers.0.self_attn[kv_head=1]"]
    assert len(select(LLAMA, "layers.1", "neuron")) == 64


@pytest.mark.parametrize("text, message", [
    ("layers.[", "expected a name, '\\*' or a number, found '\\[' at position 8"),
    ("(layers.1", "missing '\\)' at the end"),
    ("layers.1[head=x]", "expected a number or a range, found 'x' at position 15"),
    ("layers.1[color=2]", "expected one of head, kv_head, neuron"),
    ("layers.1 layers.2", "unexpected 'l' at position 10"),
    ("layers.1[head=3-1]", "range 3-1 is empty"),
    ("norm |", "expected a name at the end"),
    ("   ", "selector is empty"),
])
def test_parse_errors_point_at_the_offending_character(text: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        parse(text)


def test_selector_matching_nothing_is_an_error() -> None:
    with pytest.raises(SelectorError, match="'layers.7' matches no component at granularity 'module'"):
        select(LLAMA, "layers.7", "module")
    with pytest.raises(SelectorError, match="matches no component at granularity 'module'"):
        select(LLAMA, "layers.0.mlp[neuron=1]", "module")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_component_name_selects_exactly_itself(granularity: str) -> None:
    config = ModelConfig.tiny("qwen2", d_ff=8)
    everything = components(config, granularity)
    for component in everything:
        chosen = [c for c in everything if parse(component.name).matches(c)]
        assert chosen == [component]


# ------------------------------------------------------------------------- property tests

SEGMENTS = st.sampled_from(["layers", "*", "0", "1", "0-1", "self_attn", "mlp", "*_proj", "q_proj",
                            "down_proj", "norm", "*norm"])
PATHS = st.lists(SEGMENTS, min_size=1, max_size=4).map(".".join)


def selectors(depth: int = 2) -> st.SearchStrategy[str]:
    leaf = PATHS
    if depth == 0:
        return leaf
    inner = selectors(depth - 1)
    return st.one_of(leaf, st.builds(lambda a, b: f"({a}) | ({b})", inner, inner),
                     st.builds(lambda a, b: f"({a}) & ({b})", inner, inner),
                     st.builds(lambda a: f"~({a})", inner))


def chosen(text: str) -> set[str]:
    sel = parse(text)
    return {c.name for c in components(LLAMA, "module") if sel.matches(c)}


@settings(max_examples=150, deadline=None)
@given(selectors(), selectors())
def test_selector_algebra_is_set_algebra(a: str, b: str) -> None:
    everything = set(names(components(LLAMA, "module")))
    assert chosen(f"({a}) | ({b})") == chosen(a) | chosen(b)
    assert chosen(f"({a}) & ({b})") == chosen(a) & chosen(b)
    assert chosen(f"~({a})") == everything - chosen(a)
    assert chosen(f"~(({a}) | ({b}))") == chosen(f"~({a}) & ~({b})")  # De Morgan


@settings(max_examples=100, deadline=None)
@given(selectors())
def test_python_operators_and_printed_form_agree_with_parsing(text: str) -> None:
    sel = parse(text)
    combined = sel | parse("norm")
    assert {c.name for c in components(LLAMA, "module") if combined.matches(c)} == chosen(text) | {"norm"}
    assert chosen(str(~sel)) == chosen(f"~({text})")
    assert as_selector([text, "norm"]).matches(components(LLAMA, "module")[-2])
