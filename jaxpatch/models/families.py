"""Hugging Face families: config translation and tensor-name maps.

Each family is described declaratively: which `config.json` keys it reads (everything else must
be harmless metadata, or the config is refused), and a list of `TensorRule`s mapping each
Hugging Face tensor to canonical leaves with a small reshape in each direction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from jaxpatch.errors import UnsupportedArchitectureError, UnsupportedConfigError
from jaxpatch.models.config import FAMILIES, ModelConfig, RopeScaling

__all__ = ["HARMLESS_KEYS", "KEPT_METADATA", "ARCHITECTURES", "HF_ACTIVATIONS", "ConfigReader",
           "config_from_hf", "TRANSLATORS", "config_to_hf", "ToCanonical", "ToHF", "TensorRule",
           "tensor_rules", "is_ignored_tensor", "hf_prefix"]

# Config keys that never change the numerics of an inference forward pass.
HARMLESS_KEYS = frozenset("""
    _name_or_path architectures model_type torch_dtype dtype transformers_version
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    use_cache initializer_range return_dict output_hidden_states output_attentions torchscript
    id2label label2id num_labels tokenizer_class prefix task_specific_params problem_type
    finetuning_task is_decoder is_encoder_decoder add_cross_attention tie_encoder_decoder
    chunk_size_feed_forward cross_attention_hidden_size pruned_heads tf_legacy_loss use_bfloat16
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    attention_dropout attn_pdrop embd_pdrop resid_pdrop summary_type summary_use_proj
    summary_activation summary_proj_to_labels summary_first_dropout
    _attn_implementation_autoset n_ctx pretraining_tp cache_implementation auto_map
    custom_pipelines
""".split())
# Harmless keys whose values are kept so that a saved checkpoint carries them again.
KEPT_METADATA = ("bos_token_id", "eos_token_id", "pad_token_id")
ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Model"),
    "mistral": ("MistralForCausalLM", "MistralModel"),
    "phi3": ("Phi3ForCausalLM", "Phi3Model"),
    "gemma": ("GemmaForCausalLM", "GemmaModel"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Model"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextModel"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Model"),
}
# Sizes and counts a config claims: integers in [low, high], checked when read, so that nothing
# is ever built from an absurd claim before the weight files are compared with it.
SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("vocab_size",), (1, 1 << 22)),
    **dict.fromkeys(("hidden_size", "n_embd"), (1, 1 << 17)),
    **dict.fromkeys(("num_hidden_layers", "n_layer"), (1, 1024)),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads"), (1, 1024)),
    **dict.fromkeys(("head_dim",), (1, 4096)),
    **dict.fromkeys(("intermediate_size", "n_inner"), (1, 1 << 20)),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "sliding_window"), (1, 1 << 24)),
    **dict.fromkeys(("max_window_layers", "sliding_window_pattern", "_sliding_window_pattern"),
                    (0, 1 << 20)),
}
# Real numbers a config claims: finite and positive.
POSITIVE_NUMBERS = frozenset({"rms_norm_eps", "layer_norm_epsilon", "rope_theta",
                              "rope_local_base_freq", "query_pre_attn_scalar",
                              "attn_logit_softcapping", "final_logit_softcapping"})
# Switches: JSON booleans.
SWITCHES = frozenset({"tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
                      "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                      "reorder_and_upcast_attn", "use_bidirectional_attention"})
HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None,
    "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu",
}


class ConfigReader:
    """Reads a Hugging Face config dict, remembering which keys were understood.

    Example:
        >>> r = ConfigReader({"model_type": "llama", "hidden_size": 8}, "config.json")
        >>> r.require("hidden_size")
        8
    """

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source
        self.used: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`, or `default` when absent or null; sizes, numbers and switches
        are checked for their type and range (`SIZE_BOUNDS`, `POSITIVE_NUMBERS`, `SWITCHES`)."""
        self.used.add(key)
        value = self.raw.get(key)
        if value is None:
            return default
        self._check(key, value)
        return value

    def _check(self, key: str, value: Any) -> None:
        def bad(what: str) -> UnsupportedConfigError:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:36] + "..."
            return UnsupportedConfigError(f"{self.source}: {key}={shown} {what}")

        if key in SIZE_BOUNDS:
            low, high = SIZE_BOUNDS[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad("is not an integer")
            if not low <= value <= high:
                raise bad(f"is out of range (expected {low}..{high})")
        elif key in POSITIVE_NUMBERS:
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value) or value <= 0:
                raise bad("is not a positive number")
        elif key in SWITCHES and not isinstance(value, bool):
            raise bad("is not true or false")

    def require(self, key: str) -> Any:
        """The value of `key`; refuses the config when it is absent."""
        value = self.get(key)
        if value is None:
            raise UnsupportedConfigError(f"{self.source}: required key {key!r} is missing")
        return value

    def expect(self, key: str, allowed: Sequence[Any], default: Any) -> Any:
        """The value of `key`, refusing any value outside `allowed`."""
        value = self.get(key, default)
        if value not in allowed:
            raise UnsupportedConfigError(
                f"{self.source}: {key}={value!r} changes the numerics and is not supported "
                f"(supported: {', '.join(repr(a) for a in allowed)})"
            )
        return value

    def activation(self, key: str, default: str) -> str:
        """A Hugging Face activation name translated to jaxpatch's."""
        name = self.get(key, default)
        ours = HF_ACTIVATIONS.get(name)
        if ours is None:
            supported = sorted(k for k, v in HF_ACTIVATIONS.items() if v)
            raise UnsupportedConfigError(
                f"{self.source}: {key}={name!r} is not supported (supported: {', '.join(supported)})"
            )
        return ours

    def finish(self) -> None:
        """Refuses the config if it holds a key that is neither understood nor harmless
        (`is_harmless_key`)."""
        unknown = sorted(key for key in set(self.raw) - self.used
                         if not is_harmless_key(key, self.raw[key]))
        if unknown:
            raise UnsupportedConfigError(
                f"{self.source}: key {unknown[0]!r} is not understood by jaxpatch for "
                f"model_type {self.raw.get('model_type')!r} and may change the numerics"
                + (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
            )

    def metadata(self) -> str:
        """The kept metadata entries as a JSON string."""
        return json.dumps({k: self.raw[k] for k in KEPT_METADATA if self.raw.get(k) is not None},
                          sort_keys=True)


def is_harmless_key(key: str, value: Any) -> bool:
    """Whether a config entry no family reads leaves the numerics of inference alone, by its
    class: a known harmless key (`HARMLESS_KEYS`: generation settings, labels, bookkeeping);
    private metadata (`_name_or_path`, `_commit_hash`: a leading underscore); a special token's
    id (`*_token_id`, `*_token_ids`); a dropout rate (inert at inference); or any key at a value
    that means "off" (null, false, an empty string, list or object), as a newer transformers
    writes the switches it adds. Anything else may change the numerics.

    Example:
        >>> is_harmless_key("_model_name_or_path", "/some/dir"), is_harmless_key("unk_token_id", 3)
        (True, True)
        >>> is_harmless_key("use_new_thing", False), is_harmless_key("use_new_thing", True)
        (True, False)
    """
    if key in HARMLESS_KEYS or key.startswith("_"):
        return True
    if key.endswith(("_token_id", "_token_ids")) or "dropout" in key or key.endswith("pdrop"):
        return True
    return value is None or value is False or value in ("", [], {})


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translates a Hugging Face `config.json` (transformers 4.x or 5.x) into a `ModelConfig`.

    Arguments:
        raw: the parsed `config.json`.
        source: the file name, used in error messages.

    Returns:
        The `ModelConfig`.

    Raises:
        UnsupportedArchitectureError: the model type is not one of `FAMILIES`.
        UnsupportedConfigError: a setting changes the numerics in an unsupported way.

    Example:
        >>> cfg = config_from_hf({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
        ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
        >>> cfg.d_ff, cfg.positional
        (64, 'learned')
    """
    try:
        return _translated(raw, source)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError,
            OverflowError) as e:  # a value of the wrong type or shape somewhere
        raise UnsupportedConfigError(f"{source}: malformed config ({type(e).__name__}: "
                                     f"{str(e)[:200]})") from None


def _translated(raw: dict[str, Any], source: str) -> ModelConfig:
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in TRANSLATORS:
        raise UnsupportedArchitectureError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(FAMILIES)})"
        )
    reader = ConfigReader(raw, source)
    architectures = reader.get("architectures", [])
    if not isinstance(architectures, list):
        raise UnsupportedConfigError(f"{source}: architectures must be a list of names")
    for arch in architectures:
        if arch not in ARCHITECTURES[model_type]:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {arch!r} is not supported for {model_type} "
                f"(supported: {', '.join(ARCHITECTURES[model_type])})"
            )
    dtype = reader.get("dtype") or reader.get("torch_dtype") or "float32"
    config = TRANSLATORS[model_type](reader)
    reader.finish()
    return config.replace(dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
                          metadata=reader.metadata())


def _gpt2(r: ConfigReader) -> ModelConfig:
    d_model = r.require("n_embd")
    n_heads = r.require("n_head")
    r.expect("scale_attn_weights", [True], True)
    r.expect("scale_attn_by_inverse_layer_idx", [False], False)
    r.get("reorder_and_upcast_attn")  # only upcasts attention to float32, as jaxpatch always does
    return ModelConfig(
        family="gpt2", vocab_size=r.require("vocab_size"), d_model=d_model,
        n_layers=r.require("n_layer"), n_heads=n_heads, n_kv_heads=n_heads,
        head_dim=d_model // n_heads, d_ff=r.get("n_inner", 4 * d_model),
        max_position_embeddings=r.get("n_positions", 1024), norm="layernorm",
        norm_eps=r.get("layer_norm_epsilon", 1e-5), activation=r.activation("activation_function",
                                                                             "gelu_new"),
        gated_mlp=False, positional="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_embeddings=r.get("tie_word_embeddings", True),
    )


def _rope(r: ConfigReader) -> tuple[float, RopeScaling | None]:
    """RoPE settings from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    merged = {**r.get("rope_parameters", {}), **r.get("rope_scaling", {})}
    theta = float(merged.pop("rope_theta", r.get("rope_theta", 10000.0)))
    if float(merged.pop("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedConfigError(f"{r.source}: partial_rotary_factor != 1 is not supported")
    return theta, _rope_scaling(r.source, merged)


def _rope_scaling(source: str, merged: dict[str, Any]) -> RopeScaling | None:
    """The frequency rescaling a rope parameter dict (without its theta) asks for."""
    if not isinstance(merged, dict):
        raise UnsupportedConfigError(f"{source}: rope parameters must be an object, got {merged!r}")
    merged = dict(merged)
    kind = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    try:
        if kind == "default":
            return None
        if kind == "linear":
            return RopeScaling("linear", float(merged["factor"]))
        if kind == "llama3":
            return RopeScaling(
                "llama3", float(merged["factor"]), float(merged["low_freq_factor"]),
                float(merged["high_freq_factor"]), int(merged["original_max_position_embeddings"]))
    except KeyError as missing:
        raise UnsupportedConfigError(
            f"{source}: {kind} rope scaling lacks {missing.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UnsupportedConfigError(f"{source}: {kind} rope scaling has a bad value ({e})") from None
    raise UnsupportedConfigError(
        f"{source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _llama_like(r: ConfigReader, family: str, **fields: Any) -> ModelConfig:
    d_model = r.require("hidden_size")
    n_heads = r.require("num_attention_heads")
    theta, scaling = _rope(r)
    base: dict[str, Any] = dict(
        family=family, vocab_size=r.require("vocab_size"), d_model=d_model,
        n_layers=r.require("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=r.get("num_key_value_heads", n_heads),
        head_dim=r.get("head_dim", d_model // n_heads), d_ff=r.require("intermediate_size"),
        max_position_embeddings=r.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=r.get("rms_norm_eps", 1e-6), activation=r.activation("hidden_act", "silu"),
        rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=r.get("tie_word_embeddings", False),
    )
    return ModelConfig(**{**base, **fields})


def _llama(r: ConfigReader) -> ModelConfig:
    bias = r.get("attention_bias", False)
    return _llama_like(r, "llama", qkv_bias=bias, o_bias=bias, mlp_bias=r.get("mlp_bias", False))


def _mistral(r: ConfigReader) -> ModelConfig:
    n_layers = r.require("num_hidden_layers")
    return _llama_like(r, "mistral", sliding_windows=(r.get("sliding_window"),) * n_layers)


def _qwen_windows(r: ConfigReader) -> tuple[int | None, ...]:
    """Qwen2/Qwen3's sliding windows: none unless `use_sliding_window`, then from block
    `max_window_layers` on (or as `layer_types` says)."""
    window = r.get("sliding_window")  # read either way: it is inert without use_sliding_window
    window = window if r.get("use_sliding_window", False) else None
    first_sliding = r.get("max_window_layers", 28)
    return _layer_windows(r, window, lambda i: window is not None and i >= first_sliding)


def _layer_windows(r: ConfigReader, window: int | None,
                   slides: Callable[[int], bool]) -> tuple[int | None, ...]:
    """Each block's window from `layer_types` ("sliding_attention" or "full_attention"), or,
    when the config has none, from `slides(block)`."""
    n_layers = r.require("num_hidden_layers")
    types = r.get("layer_types") or [
        "sliding_attention" if slides(i) else "full_attention" for i in range(n_layers)]
    if (not isinstance(types, list) or set(types) - {"sliding_attention", "full_attention"}
            or len(types) != n_layers):
        raise UnsupportedConfigError(f"{r.source}: layer_types {types!r} is not supported")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _qwen2(r: ConfigReader) -> ModelConfig:
    return _llama_like(r, "qwen2", qkv_bias=True, sliding_windows=_qwen_windows(r))


def _qwen3(r: ConfigReader) -> ModelConfig:
    bias = r.get("attention_bias", False)
    return _llama_like(r, "qwen3", qkv_bias=bias, o_bias=bias, qk_norm="head_dim",
                       sliding_windows=_qwen_windows(r))


def _olmo2(r: ConfigReader) -> ModelConfig:
    bias = r.get("attention_bias", False)
    return _llama_like(r, "olmo2", qkv_bias=bias, o_bias=bias, qk_norm="projection",
                       norm_layout="post", norm_scale_in_float32=True)


def _phi3(r: ConfigReader) -> ModelConfig:
    r.expect("attention_bias", [False], False)  # Phi-3's projections never carry biases
    r.get("original_max_position_embeddings")  # only read by longrope, which is refused
    n_layers = r.require("num_hidden_layers")
    return _llama_like(r, "phi3", sliding_windows=(r.get("sliding_window"),) * n_layers)


def _gemma(r: ConfigReader) -> ModelConfig:
    r.expect("use_bidirectional_attention", [None, False], None)
    if r.get("hidden_activation") is not None:  # transformers 4.x: used literally
        act = r.activation("hidden_activation", "gelu_pytorch_tanh")
    else:  # "gelu" in Gemma configs is the legacy name of the tanh approximation
        act = "gelu_tanh" if r.get("hidden_act") == "gelu" else r.activation("hidden_act",
                                                                            "gelu_pytorch_tanh")
    bias = r.get("attention_bias", False)
    return _llama_like(r, "gemma", activation=act, norm_weight_offset=1.0,
                       norm_scale_in_float32=True, scale_embeddings=True,
                       qkv_bias=bias, o_bias=bias, tie_embeddings=r.get("tie_word_embeddings", True))


def _gemma_2_and_3(r: ConfigReader, family: str, pattern: int, **fields: Any) -> ModelConfig:
    """What Gemma 2 and Gemma 3 share: sandwich norms, `(1 + w)` norms, scaled embeddings,
    `query_pre_attn_scalar`, logit softcapping, and every `pattern`-th block attending fully
    (the others slide) unless `layer_types` says otherwise."""
    r.expect("use_bidirectional_attention", [None, False], None)
    r.get("hidden_act")  # transformers reads hidden_activation; hidden_act is a leftover
    bias = r.get("attention_bias", False)
    windows = _layer_windows(r, r.get("sliding_window", 4096), lambda i: bool((i + 1) % pattern))
    return _llama_like(
        r, family, activation=r.activation("hidden_activation", "gelu_pytorch_tanh"),
        norm_weight_offset=1.0, norm_scale_in_float32=True, scale_embeddings=True,
        qkv_bias=bias, o_bias=bias, tie_embeddings=r.get("tie_word_embeddings", True),
        head_dim=r.get("head_dim", 256), sliding_windows=windows,
        attention_scale=float(r.get("query_pre_attn_scalar", 256)) ** -0.5,
        norm_layout="sandwich", attn_logit_softcap=r.get("attn_logit_softcapping"),
        final_logit_softcap=r.get("final_logit_softcapping"), **fields)


def _gemma2(r: ConfigReader) -> ModelConfig:
    return _gemma_2_and_3(r, "gemma2", 2, max_position_embeddings=r.get("max_position_embeddings",
                                                                         8192))


def _gemma3_text(r: ConfigReader) -> ModelConfig:
    pattern = r.get("sliding_window_pattern", r.get("_sliding_window_pattern", 6))
    # 5.x: rope_parameters per layer type; 4.x: rope_theta, rope_local_base_freq, rope_scaling.
    per_type = r.get("rope_parameters", {})
    if not isinstance(per_type, dict):
        raise UnsupportedConfigError(f"{r.source}: rope_parameters must be an object")
    full = dict(per_type.get("full_attention") or r.get("rope_scaling", {}) or {})
    local = dict(per_type.get("sliding_attention") or {})
    theta = float(full.pop("rope_theta", r.get("rope_theta", 1_000_000.0)))
    local_theta = float(local.pop("rope_theta", r.get("rope_local_base_freq", 10_000.0)))
    if _rope_scaling(r.source, local) is not None:
        raise UnsupportedConfigError(f"{r.source}: rope scaling of sliding-window layers is not "
                                     "supported")
    return _gemma_2_and_3(
        r, "gemma3_text", pattern,
        max_position_embeddings=r.get("max_position_embeddings", 131_072), rope_theta=theta,
        rope_scaling=_rope_scaling(r.source, full), sliding_rope_theta=local_theta,
        qk_norm="head_dim")


TRANSLATORS: dict[str, Callable[[ConfigReader], ModelConfig]] = {
    "gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral,
    "phi3": _phi3, "gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3_text,
    "olmo2": _olmo2,
}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` for a `ModelConfig` (readable by transformers 4.x and 5.x).

    Example:
        >>> config_to_hf(ModelConfig.tiny("gpt2"))["architectures"]
        ['GPT2LMHeadModel']
    """
    c = config
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[c.family][0]], "model_type": c.family,
                           "torch_dtype": c.dtype, "vocab_size": c.vocab_size,
                           "tie_word_embeddings": c.tie_embeddings}
    hf_act = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}
    if c.family == "gpt2":
        out.update(n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
                   n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
                   activation_function="gelu_new" if c.activation == "gelu_tanh" else c.activation)
    else:
        out.update(hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                   num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.d_ff,
                   max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
                   hidden_act=hf_act[c.activation], rope_theta=c.rope_theta)
        if c.rope_scaling is not None:
            s = c.rope_scaling
            scaling: dict[str, Any] = {"rope_type": s.kind, "factor": s.factor}
            if s.kind == "llama3":
                scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                               original_max_position_embeddings=s.original_max_position_embeddings)
            out["rope_scaling"] = scaling
    window = next((w for w in c.sliding_windows if w is not None), None)
    layer_types = ["full_attention" if w is None else "sliding_attention" for w in c.sliding_windows]
    if c.family in ("llama", "qwen3", "olmo2", "gemma", "gemma2", "gemma3_text"):
        out["attention_bias"] = c.qkv_bias
    if c.family == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.family in ("gemma", "gemma2", "gemma3_text"):
        out["hidden_activation"] = hf_act[c.activation]
    if c.family in ("gemma2", "gemma3_text"):
        scalar = c.head_dim if c.attention_scale is None else c.attention_scale ** -2
        out.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-9
                   else scalar, sliding_window=window, layer_types=layer_types,
                   attn_logit_softcapping=c.attn_logit_softcap,
                   final_logit_softcapping=c.final_logit_softcap)
    if c.family == "gemma3_text":
        out["rope_local_base_freq"] = c.sliding_rope_theta or c.rope_theta
    if c.family in ("mistral", "phi3"):
        out["sliding_window"] = c.sliding_windows[0]
    if c.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=c.n_layers, layer_types=layer_types)
    # Token ids the model was not given are written as null, so that transformers does not
    # fill in its class defaults (Phi-3's pad id 32000 lies outside a small vocabulary).
    out.update({**dict.fromkeys(KEPT_METADATA), **json.loads(c.metadata)})
    return out


# ---------------------------------------------------------------- tensor name maps

ToCanonical = Callable[[np.ndarray], tuple[np.ndarray, ...]]
ToHF = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one Hugging Face tensor becomes one or more canonical leaves, and back.

    Attributes:
        hf_name: the tensor's name in the checkpoint (with the family's usual prefix).
        hf_shape: its shape in the checkpoint.
        leaves: the canonical dotted leaf names it fills.
        to_canonical: HF array -> canonical arrays (one per leaf), views of the HF array
            (transposed, reshaped, split) so a loader can read a slice of a leaf without
            reading the whole tensor.
        to_hf: canonical arrays -> HF array.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    leaves: tuple[str, ...]
    to_canonical: ToCanonical
    to_hf: ToHF


def _copy(hf_name: str, leaf: str, shape: tuple[int, ...]) -> TensorRule:
    return TensorRule(hf_name, shape, (leaf,), lambda a: (a,), lambda xs: xs[0])


def _reshaped(hf_name: str, leaf: str, hf_shape: tuple[int, ...],
              shape: tuple[int, ...]) -> TensorRule:
    """A tensor stored with the same element order, only reshaped (biases, Conv1D weights)."""
    return TensorRule(hf_name, hf_shape, (leaf,), lambda a: (a.reshape(shape),),
                      lambda xs: xs[0].reshape(hf_shape))


def _torch_linear(hf_name: str, leaf: str, shape: tuple[int, ...], in_ndim: int) -> TensorRule:
    """A `torch.nn.Linear` weight (`[out, in]`) stored input-major with head axes exposed.

    `in_ndim` says how many leading canonical axes form the input (2 for o_proj's
    `[heads, head_dim, d_model]`, else 1).
    """
    n_in = math.prod(shape[:in_ndim])
    n_out = math.prod(shape[in_ndim:])
    return TensorRule(hf_name, (n_out, n_in), (leaf,), lambda a: (a.T.reshape(shape),),
                      lambda xs: np.ascontiguousarray(xs[0].reshape(n_in, n_out).T))


def _split_columns(hf_name: str, leaves: tuple[str, ...], hf_shape: tuple[int, ...],
                   shape: tuple[int, ...]) -> TensorRule:
    """GPT-2's fused `c_attn` (`[..., 3 * d]`): split the last axis into q, k, v."""
    def to_canonical(a: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(p.reshape(shape) for p in np.split(a, 3, axis=-1))

    def to_hf(xs: Sequence[np.ndarray]) -> np.ndarray:
        lead = hf_shape[:-1]
        return np.concatenate([x.reshape(*lead, -1) for x in xs], axis=-1)

    return TensorRule(hf_name, hf_shape, leaves, to_canonical, to_hf)


def tensor_rules(config: ModelConfig) -> list[TensorRule]:
    """The full tensor-name map of a config, in checkpoint order.

    Example:
        >>> [r.hf_name for r in tensor_rules(ModelConfig.tiny("llama"))][:2]
        ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
    """
    return _gpt2_rules(config) if config.family == "gpt2" else _llama_rules(config)


def _gpt2_rules(c: ModelConfig) -> list[TensorRule]:
    d, h, k = c.d_model, c.n_heads, c.head_dim
    rules = [_copy("transformer.wte.weight", "embed_tokens.weight", (c.vocab_size, d)),
             _copy("transformer.wpe.weight", "embed_positions.weight",
                   (c.max_position_embeddings, d))]
    for i in range(c.n_layers):
        hf, ours = f"transformer.h.{i}", f"layers.{i}"
        qkv = tuple(f"{ours}.self_attn.{p}_proj" for p in "qkv")
        rules += [
            _copy(f"{hf}.ln_1.weight", f"{ours}.input_layernorm.weight", (d,)),
            _copy(f"{hf}.ln_1.bias", f"{ours}.input_layernorm.bias", (d,)),
            _split_columns(f"{hf}.attn.c_attn.weight", tuple(f"{q}.weight" for q in qkv),
                           (d, 3 * h * k), (d, h, k)),
            _split_columns(f"{hf}.attn.c_attn.bias", tuple(f"{q}.bias" for q in qkv),
                           (3 * h * k,), (h, k)),
            _reshaped(f"{hf}.attn.c_proj.weight", f"{ours}.self_attn.o_proj.weight", (h * k, d),
                      (h, k, d)),
            _copy(f"{hf}.attn.c_proj.bias", f"{ours}.self_attn.o_proj.bias", (d,)),
            _copy(f"{hf}.ln_2.weight", f"{ours}.post_attention_layernorm.weight", (d,)),
            _copy(f"{hf}.ln_2.bias", f"{ours}.post_attention_layernorm.bias", (d,)),
            _copy(f"{hf}.mlp.c_fc.weight", f"{ours}.mlp.up_proj.weight", (d, c.d_ff)),
            _copy(f"{hf}.mlp.c_fc.bias", f"{ours}.mlp.up_proj.bias", (c.d_ff,)),
            _copy(f"{hf}.mlp.c_proj.weight", f"{ours}.mlp.down_proj.weight", (c.d_ff, d)),
            _copy(f"{hf}.mlp.c_proj.bias", f"{ours}.mlp.down_proj.bias", (d,)),
        ]
    rules += [_copy("transformer.ln_f.weight", "norm.weight", (d,)),
              _copy("transformer.ln_f.bias", "norm.bias", (d,))]
    if not c.tie_embeddings:
        rules.append(_torch_linear("lm_head.weight", "lm_head.weight", (d, c.vocab_size), 1))
    return rules


def _split_rows(hf_name: str, leaves: tuple[str, ...],
                shapes: tuple[tuple[int, ...], ...]) -> TensorRule:
    """A fused `torch.nn.Linear` weight (`[sum of outputs, in]`, Phi-3's `qkv_proj` and
    `gate_up_proj`) split by rows into input-major leaves (`[in, *output axes]` each)."""
    n_in = shapes[0][0]
    sizes = [math.prod(shape[1:]) for shape in shapes]
    cuts = list(np.cumsum(sizes)[:-1])

    def to_canonical(a: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(part.T.reshape(shape) for part, shape in zip(np.split(a, cuts), shapes))

    def to_hf(xs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([x.reshape(n_in, -1).T for x in xs], axis=0)

    return TensorRule(hf_name, (sum(sizes), n_in), leaves, to_canonical, to_hf)


def _attention_rules(c: ModelConfig, hf: str, ours: str) -> list[TensorRule]:
    """One block's attention tensors: q, k, v (fused for Phi-3), their norms, o."""
    d, k = c.d_model, c.head_dim
    heads = {"q_proj": c.n_heads, "k_proj": c.n_kv_heads, "v_proj": c.n_kv_heads}
    if c.family == "phi3":
        rules = [_split_rows(f"{hf}.self_attn.qkv_proj.weight",
                             tuple(f"{ours}.self_attn.{p}.weight" for p in heads),
                             tuple((d, n, k) for n in heads.values()))]
    else:
        rules = [_torch_linear(f"{hf}.self_attn.{p}.weight", f"{ours}.self_attn.{p}.weight",
                               (d, n, k), 1) for p, n in heads.items()]
    if c.qkv_bias:
        rules += [_reshaped(f"{hf}.self_attn.{p}.bias", f"{ours}.self_attn.{p}.bias", (n * k,), (n, k))
                  for p, n in heads.items()]
    if c.qk_norm == "head_dim":
        rules += [_copy(f"{hf}.self_attn.{n}.weight", f"{ours}.self_attn.{n}.weight", (k,))
                  for n in ("q_norm", "k_norm")]
    elif c.qk_norm == "projection":
        rules += [_reshaped(f"{hf}.self_attn.{n}.weight", f"{ours}.self_attn.{n}.weight",
                            (count * k,), (count, k))
                  for n, count in (("q_norm", c.n_heads), ("k_norm", c.n_kv_heads))]
    rules.append(_torch_linear(f"{hf}.self_attn.o_proj.weight", f"{ours}.self_attn.o_proj.weight",
                               (c.n_heads, k, d), 2))
    if c.o_bias:
        rules.append(_copy(f"{hf}.self_attn.o_proj.bias", f"{ours}.self_attn.o_proj.bias", (d,)))
    return rules


def _mlp_rules(c: ModelConfig, hf: str, ours: str) -> list[TensorRule]:
    """One block's MLP tensors: gate and up (fused for Phi-3), down."""
    d = c.d_model
    shapes = {"gate_proj": (d, c.d_ff), "up_proj": (d, c.d_ff), "down_proj": (c.d_ff, d)}
    if c.family == "phi3":
        rules = [_split_rows(f"{hf}.mlp.gate_up_proj.weight",
                             (f"{ours}.mlp.gate_proj.weight", f"{ours}.mlp.up_proj.weight"),
                             ((d, c.d_ff), (d, c.d_ff))),
                 _torch_linear(f"{hf}.mlp.down_proj.weight", f"{ours}.mlp.down_proj.weight",
                               shapes["down_proj"], 1)]
    else:
        rules = [_torch_linear(f"{hf}.mlp.{p}.weight", f"{ours}.mlp.{p}.weight", shape, 1)
                 for p, shape in shapes.items()]
    if c.mlp_bias:
        rules += [_copy(f"{hf}.mlp.{p}.bias", f"{ours}.mlp.{p}.bias", (shape[1],))
                  for p, shape in shapes.items()]
    return rules


def _norm_rule(hf: str, ours: str, d: int, name: str) -> TensorRule:
    """A block's residual-width norm `name`, with the block's Hugging Face and canonical prefix."""
    return _copy(f"{hf}.{name}.weight", f"{ours}.{name}.weight", (d,))


def _llama_rules(c: ModelConfig) -> list[TensorRule]:
    d = c.d_model
    rules = [_copy("model.embed_tokens.weight", "embed_tokens.weight", (c.vocab_size, d))]
    for i in range(c.n_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        norm = functools.partial(_norm_rule, hf, ours, d)
        if c.pre_attention_norm is not None:
            rules.append(norm(c.pre_attention_norm))
        rules += _attention_rules(c, hf, ours)
        rules.append(norm("post_attention_layernorm"))
        if c.norm_layout == "sandwich":
            rules.append(norm("pre_feedforward_layernorm"))
        rules += _mlp_rules(c, hf, ours)
        if c.output_norms is not None:
            rules.append(norm("post_feedforward_layernorm"))
    rules.append(_copy("model.norm.weight", "norm.weight", (d,)))
    if not c.tie_embeddings:
        rules.append(_torch_linear("lm_head.weight", "lm_head.weight", (d, c.vocab_size), 1))
    return rules


def _ignored_pattern(config: ModelConfig) -> re.Pattern[str]:
    """Tensors a checkpoint may hold that carry no parameters jaxpatch uses."""
    patterns = [r".*rotary_emb\.inv_freq", r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias"]
    if config.tie_embeddings:
        patterns.append(r"lm_head\.weight")  # transformers ties it to the embedding on load
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def is_ignored_tensor(config: ModelConfig, name: str) -> bool:
    """Whether a checkpoint tensor is a known non-parameter (a cached buffer, a tied head).

    Example:
        >>> is_ignored_tensor(ModelConfig.tiny("gpt2"), "transformer.h.0.attn.bias")
        True
    """
    return _ignored_pattern(config).fullmatch(name) is not None


def hf_prefix(config: ModelConfig) -> str:
    """The prefix Hugging Face's *ForCausalLM classes put before base-model tensors.

    Example:
        >>> hf_prefix(ModelConfig.tiny("gpt2"))
        'transformer.'
    """
    return "transformer." if config.family == "gpt2" else "model."
