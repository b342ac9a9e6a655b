"""A model out of a GGUF file: llama.cpp's metadata mapped to a `ModelConfig`, its tensor names
to Hugging Face's, its tensors dequantized, and its vocabulary rebuilt as a `tokenizers`
tokenizer that encodes text as transformers' GGUF tokenizer does.

Supported architectures: `gemma3` (Gemma 3 text models, sentencepiece vocabulary), `llama`
(query and key rows put back from llama.cpp's rotary order into Hugging Face's), `qwen2` and
`qwen3` (byte-level BPE vocabularies with their merges). Others are refused by name, as are
settings jaxpatch does not implement (Llama 3.1's `rope_freqs.weight`, yarn scaling). For Gemma 3,
where the file is silent, the numbers transformers and llama.cpp agree on are used:
sliding-window attention in five of every six blocks with a rope base of 10,000 there, and query
scaling by `head_dim ** -0.5` (`(d_model / n_heads) ** -0.5` for the 62-block 27B model, as
llama.cpp does; transformers' GGUF loader always uses 256 ** -0.5, which agrees for every
released size but 27B). Qwen3's head size is read from `attention.key_length`, which
transformers' GGUF loader ignores (it assumes 128, right for the released sizes).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpatch.chat import ChatTemplate
from jaxpatch.errors import (
    CorruptCheckpointError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
    UnsupportedConfigError,
)
from jaxpatch.io.gguf import GGUFFile, read_gguf, read_gguf_tensor
from jaxpatch.io.hf import fill_params
from jaxpatch.models.config import DTYPES, ModelConfig, Params, RopeScaling
from jaxpatch.models.families import tensor_rules
from jaxpatch.models.model import Model

__all__ = ["GGUF_ARCHITECTURES", "BYTE_LEVEL_SPLITS", "gguf_config", "gguf_to_hf_name",
           "unpermute_rows", "load_gguf", "gguf_chat_template", "gguf_tokenizer",
           "byte_level_tokenizer", "is_gguf"]

GGUF_ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3")

# GGUF tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _field(header: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = header.metadata.get(key, default)
    if value is None:
        raise CorruptCheckpointError(f"{header.path}: metadata {key!r} is missing")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CorruptCheckpointError(f"{header.path}: metadata {key!r}={value!r} has the wrong type")
    return value


def gguf_config(header: GGUFFile) -> ModelConfig:
    """The `ModelConfig` a GGUF file's metadata describes.

    Arguments:
        header: from `read_gguf`.

    Returns:
        The config (dtype float32: the dequantized values).

    Raises:
        UnsupportedArchitectureError: the architecture is not in `GGUF_ARCHITECTURES`.
        CorruptCheckpointError, UnsupportedConfigError: metadata missing, mistyped or absurd, or
            a setting jaxpatch does not implement (named).

    Example:
        >>> gguf_config(read_gguf(fixtures / "gemma3.gguf")).family
        'gemma3_text'
    """
    arch = header.metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{header.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    a = f"{arch}."

    def size(key: str, default: int | None = None) -> int:
        value = _field(header, a + key, int, default)
        if not 0 < value <= 1 << 24:
            raise UnsupportedConfigError(f"{header.path}: {a + key}={value} is not a plausible size")
        return value

    n_layers = size("block_count")
    d_model = size("embedding_length")
    n_heads = size("attention.head_count")
    head_dim = size("attention.key_length", size("rope.dimension_count", d_model // n_heads))
    if size("attention.value_length", head_dim) != head_dim:
        raise UnsupportedConfigError(f"{header.path}: key and value lengths differ")
    if size("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedConfigError(f"{header.path}: {a}rope.dimension_count != the head size "
                                     "(a partial rotary embedding) is not supported")
    if "rope_freqs.weight" in header.tensors:
        raise UnsupportedConfigError(f"{header.path}: tensor 'rope_freqs.weight' (Llama 3.1's "
                                     "rotary frequency factors) is not supported")
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None:
        raise MissingTensorError(f"{header.path}: tensor 'token_embd.weight' is missing")
    scaling = header.metadata.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedConfigError(f"{header.path}: rope scaling {scaling!r} is not supported "
                                     "(supported: none, linear)")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = RopeScaling("linear", float(_field(header, a + "rope.scaling.factor",
                                                          (int, float))))
    ids = {name: header.metadata.get(f"tokenizer.ggml.{key}") for name, key in (
        ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"))}
    common: dict[str, Any] = dict(
        vocab_size=embedding.shape[0], d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=size("attention.head_count_kv", n_heads), head_dim=head_dim,
        d_ff=size("feed_forward_length"), max_position_embeddings=size("context_length"),
        norm_eps=float(_field(header, a + "attention.layer_norm_rms_epsilon", float, 1e-6)),
        rope_scaling=rope_scaling, tie_embeddings="output.weight" not in header.tensors,
        metadata=json.dumps({k: v for k, v in ids.items() if isinstance(v, int)}, sort_keys=True))
    theta = float(_field(header, a + "rope.freq_base", (int, float),
                         1_000_000.0 if arch == "gemma3" else 10_000.0))
    biased = {module: f"blk.0.{module}.bias" in header.tensors for module in ("attn_q", "attn_output")}
    try:
        if arch == "gemma3":
            window = size("attention.sliding_window", 4096)
            return ModelConfig(
                family="gemma3_text", **common, norm_weight_offset=1.0, norm_scale_in_float32=True,
                activation="gelu_tanh", scale_embeddings=True, rope_theta=theta,
                sliding_windows=tuple(None if (i + 1) % 6 == 0 else window for i in range(n_layers)),
                sliding_rope_theta=10_000.0,
                attention_scale=_query_scale(n_layers, d_model, n_heads, head_dim),
                qk_norm="head_dim", norm_layout="sandwich")
        return ModelConfig(
            family={"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[arch], **common,  # type: ignore[arg-type]
            rope_theta=theta, qkv_bias=biased["attn_q"], o_bias=biased["attn_output"],
            qk_norm="head_dim" if arch == "qwen3" else None)
    except ValueError as e:
        raise UnsupportedConfigError(f"{header.path}: {e}") from None


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of a Llama query or key projection (`[heads * head_dim,
    d_model]`, rows of each head interleaved in pairs for its rotary layout) back to Hugging
    Face's rotate-half order.

    Example:
        >>> unpermute_rows(np.arange(4.0)[:, None], 1)[:, 0].tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _query_scale(n_layers: int, d_model: int, n_heads: int, head_dim: int) -> float:
    """Gemma 3's query scaling, which a GGUF file does not store: llama.cpp's rule,
    `(d_model / n_heads) ** -0.5` for the 27B model (62 blocks, query_pre_attn_scalar 168) and
    `head_dim ** -0.5` otherwise (the released models' query_pre_attn_scalar equals head_dim)."""
    return (d_model / n_heads) ** -0.5 if n_layers == 62 else head_dim ** -0.5


def gguf_to_hf_name(name: str, config: ModelConfig) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for a name it does not know. llama.cpp's
    `ffn_norm` is the norm before the MLP (Llama's `post_attention_layernorm`, Gemma 3's
    `pre_feedforward_layernorm`).

    Example:
        >>> from jaxpatch.models.config import ModelConfig
        >>> gguf_to_hf_name("blk.3.ffn_norm.weight", ModelConfig.tiny("gemma3_text"))
        'model.layers.3.pre_feedforward_layernorm.weight'
        >>> gguf_to_hf_name("blk.3.ffn_norm.weight", ModelConfig.tiny("llama"))
        'model.layers.3.post_attention_layernorm.weight'
    """
    match = _BLOCK.fullmatch(name)
    if match:
        layer, module, leaf = match.groups()
        hf = config.pre_mlp_norm if module == "ffn_norm" else _BLOCK_NAMES.get(module)
        return None if hf is None else f"model.layers.{layer}.{hf}.{leaf}"
    stem, _, leaf = name.rpartition(".")
    hf = _TOP_NAMES.get(stem)
    return None if hf is None else f"{hf}.{leaf}"


def load_gguf(path: str | os.PathLike[str], dtype: str | None = None) -> Model:
    """Loads a GGUF checkpoint: config, dequantized params and tokenizer.

    Arguments:
        path: the `.gguf` file.
        dtype: "float32" (default), "bfloat16" or "float16" for the params.

    Returns:
        The `Model` (its tokenizer encodes text as transformers' tokenizer for the file does).

    Raises:
        JaxpatchError: a subclass naming the file, metadata key or tensor at fault.

    Example:
        >>> model = load_gguf(fixtures / "gemma3.gguf")
        >>> model([[2, 5, 7]]).shape
        (1, 3, 96)
    """
    header = read_gguf(path)
    config = gguf_config(header)
    if dtype is not None:
        if dtype not in DTYPES:
            raise UnsupportedConfigError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        config = config.replace(dtype=dtype)
    by_hf: dict[str, str] = {}
    for name in header.tensors:
        hf = gguf_to_hf_name(name, config)
        if hf is None:
            raise UnexpectedTensorError(f"{header.path}: tensor {name!r} is not part of a "
                                        f"{config.family} model")
        by_hf[hf] = name
    rules = tensor_rules(config)
    expected = {rule.hf_name for rule in rules}
    for hf, name in by_hf.items():
        if hf not in expected:
            raise UnexpectedTensorError(f"{header.path}: tensor {name!r} ({hf}) does not fit "
                                        "the architecture its metadata describes")
    leaves: dict[str, jax.Array] = {}
    for rule in rules:
        name = by_hf.get(rule.hf_name)
        if name is None:
            raise MissingTensorError(f"{header.path}: tensor for {rule.hf_name!r} is missing")
        info = header.tensors[name]
        if info.shape != rule.hf_shape:
            raise TensorShapeError(f"{header.path}: tensor {name!r} has shape {info.shape}, "
                                   f"expected {rule.hf_shape} from the metadata")
        array = read_gguf_tensor(header, name)
        if config.norm_weight_offset and name.endswith("norm.weight"):
            array = array - np.float32(1.0)  # llama.cpp stores Gemma's norm weights as 1 + w
        if config.family == "llama" and re.search(r"\.attn_[qk]\.weight$", name):
            heads = config.n_heads if ".attn_q." in name else config.n_kv_heads
            array = unpermute_rows(array, heads)
        for leaf, value in zip(rule.leaves, rule.to_canonical(array)):
            leaves[leaf] = jax.device_put(np.ascontiguousarray(value, config.jnp_dtype))
    params: Params = fill_params(config, leaves)
    return Model(config, params, gguf_tokenizer(header), str(header.path), gguf_chat_template(header))


def gguf_chat_template(header: GGUFFile) -> ChatTemplate | None:
    """The chat template a GGUF file carries (`tokenizer.chat_template`), with its bos and eos
    tokens, or None.

    Example:
        >>> from jaxpatch.io.gguf import read_gguf
        >>> gguf_chat_template(read_gguf(fixtures / "gemma3.gguf")) is None
        True
    """
    source = header.metadata.get("tokenizer.chat_template")
    if not isinstance(source, str):
        return None
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    special = []
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        index = header.metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(tokens, list) and isinstance(index, int) and 0 <= index < len(tokens):
            special.append((name, tokens[index]))
    return ChatTemplate(source, tuple(special), f"{header.path} (tokenizer.chat_template)")


# ----------------------------------------------------------------------------------- tokenizer

# How a byte-level vocabulary splits text before its merges, by `tokenizer.ggml.pre` (the
# patterns transformers' GGUF tokenizer uses; other names split as GPT-2 does).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                     "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
                     "deepseek-r1-qwen": _QWEN2_SPLIT}


def gguf_tokenizer(header: GGUFFile) -> Any:
    """The tokenizer a GGUF file's vocabulary describes, as a `tokenizers.Tokenizer`: a Gemma
    sentencepiece vocabulary (`tokenizer.ggml.model` "llama" in a `gemma3` file), or a byte-level
    BPE with its merges ("gpt2": Llama 3, Qwen; `byte_level_tokenizer`).

    The sentencepiece one is a BPE with byte fallback: spaces become `▁`, text is split after each
    space run, and the merges, which the file does not list, are every split of a vocabulary
    entry into two entries, ranked by the entry's position in the vocabulary (Gemma's scores do
    not follow its merge order). Control tokens stay whole and are special; user-defined tokens
    stay whole; `<bos>` is prepended when the file says so. This is the tokenizer transformers
    builds for the file, rebuilt here without transformers.

    Arguments:
        header: from `read_gguf`.

    Returns:
        The tokenizer.

    Raises:
        UnsupportedConfigError: another tokenizer model (or a sentencepiece one outside Gemma).
        CorruptCheckpointError: the vocabulary, its types or the special ids are malformed.

    Example:
        >>> tok = gguf_tokenizer(read_gguf(fixtures / "gemma3.gguf"))
        >>> tok.encode("ab").tokens[0]
        '<bos>'
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    meta = header.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens, types = _vocabulary(header)
    if kind == "gpt2":
        return byte_level_tokenizer(header, tokens, types)
    if kind != "llama" or meta.get("general.architecture") != "gemma3":
        raise UnsupportedConfigError(f"{header.path}: tokenizer model {kind!r} is not supported "
                                     "here (supported: gpt2, the byte-level BPE of Llama 3 and "
                                     "Qwen; llama, the sentencepiece BPE of Gemma)")
    # Gemma files spell tokens of several spaces with real spaces; the model splits text into
    # `▁` runs, so they are looked up under that spelling.
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab: dict[str, int] = {}
    for index, token in enumerate(spelled):
        vocab[token] = index
    merges = _merges(spelled, vocab)
    special = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if not isinstance(unk_id, int) or not 0 <= unk_id < len(tokens):
        raise CorruptCheckpointError(f"{header.path}: tokenizer.ggml.unknown_token_id is missing "
                                     "or out of range")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=spelled[unk_id],
                                     fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")  # pyright: ignore[reportAttributeAccessIssue]
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # pyright: ignore[reportAttributeAccessIssue]
    tokenizer.decoder = decoders.Sequence(  # pyright: ignore[reportAttributeAccessIssue]
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [AddedToken(t, normalized=False, special=True) for i, t in enumerate(tokens)
               if (types and types[i] == 3) or i in special]
    tokenizer.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for i, t in enumerate(tokens)
            if types and types[i] == 4 and spelled[i] == t]
    tokenizer.add_tokens(user)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", True) and isinstance(bos_id, int) \
            and 0 <= bos_id < len(tokens):
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(  # pyright: ignore[reportAttributeAccessIssue]
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tokenizer


def _vocabulary(header: GGUFFile) -> tuple[list[str], list[int]]:
    """The file's tokens and their types (empty when the file gives none), checked."""
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    types = header.metadata.get("tokenizer.ggml.token_type", [])
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CorruptCheckpointError(f"{header.path}: tokenizer.ggml.tokens is not a list of strings")
    if not isinstance(types, list) or (types and len(types) != len(tokens)):
        raise CorruptCheckpointError(f"{header.path}: tokenizer.ggml.token_type does not match "
                                     "the vocabulary")
    return tokens, types


def byte_level_tokenizer(header: GGUFFile, tokens: list[str], types: list[int]) -> Any:
    """A byte-level BPE from a GGUF vocabulary and its merges (`tokenizer.ggml.model` "gpt2"),
    as transformers builds it for the file: tokens spelled in GPT-2's byte alphabet, text split
    by the pattern `tokenizer.ggml.pre` names (`BYTE_LEVEL_SPLITS`, else GPT-2's), control tokens
    special and whole, user-defined tokens whole; nothing added around the text.

    Example:
        >>> from types import SimpleNamespace
        >>> meta = {"tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "qwen2"}
        >>> tok = byte_level_tokenizer(SimpleNamespace(metadata=meta, path="x.gguf"),
        ...                            ["a", "b", "ab", "<|end|>"], [1, 1, 1, 3])
        >>> tok.encode("abab<|end|>").ids
        [2, 2, 3]
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = header.metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1
                                               for m in merges):
        raise CorruptCheckpointError(f"{header.path}: tokenizer.ggml.merges is missing or not a "
                                     "list of 'left right' pairs")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelling = _byte_spelling()
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None,  # pyright: ignore[reportArgumentType]
                                     fuse_unk=False, byte_fallback=False))
    split = BYTE_LEVEL_SPLITS.get(str(header.metadata.get("tokenizer.ggml.pre")))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # pyright: ignore[reportAttributeAccessIssue]
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # pyright: ignore[reportAttributeAccessIssue]
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()  # pyright: ignore[reportAttributeAccessIssue]
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == 3 and set(t) <= alphabet]
    tokenizer.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == 4 and t in vocab]
    tokenizer.add_tokens(user)
    return tokenizer


@functools.lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (printable Latin-1 as itself, the rest shifted
    past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelled = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return spelled


def _merges(spelled: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of an entry into two entries, best first: by the entry's position in the
    vocabulary, then the longer left piece, the longer right piece; within an entry, by the
    pieces' ids."""
    ranked: list[tuple[int, int, int, str, str]] = []
    seen: set[str] = set()
    for token in spelled:
        if token in seen:
            continue
        seen.add(token)
        rank = vocab[token]
        local = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked += [(rank, -len(left), -len(right), left, right) for left, right in local]
    ranked.sort(key=lambda m: (m[0], m[1], m[2]))
    return [(left, right) for _, _, _, left, right in ranked]


def is_gguf(path: Path) -> bool:
    """Whether a path is meant as a GGUF file: a file named `*.gguf` or starting with the
    GGUF magic (a `.gguf` file without the magic is then refused by `read_gguf`).

    Example:
        >>> is_gguf(fixtures / "gemma3.gguf"), is_gguf(fixtures / "gemma3")
        (True, False)
    """
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return path.suffix.lower() == ".gguf" or handle.read(4) == b"GGUF"
