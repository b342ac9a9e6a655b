"""The architecture description shared by every model family.

A `ModelConfig` says everything the forward pass needs and nothing else. It is a frozen,
hashable dataclass, so it can be a static argument of `jax.jit`. Family-specific Hugging Face
configs are translated into it by `jaxpatch.models.families`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Family", "FAMILIES", "NormLayout", "QKNorm", "ACTIVATIONS", "DTYPES", "RopeScaling",
           "ModelConfig", "Params", "param_shapes", "init_params", "count_params"]

Family = Literal["gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2",
                 "gemma3_text", "olmo2"]
FAMILIES: tuple[str, ...] = get_args(Family)
NormLayout = Literal["pre", "sandwich", "post"]
QKNorm = Literal["head_dim", "projection"]
ACTIVATIONS: tuple[str, ...] = ("gelu_tanh", "gelu", "silu", "relu")
DTYPES: dict[str, jnp.dtype] = {
    "float32": jnp.dtype(jnp.float32),
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "float16": jnp.dtype(jnp.float16),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rotary-embedding frequency rescaling, as Hugging Face defines it.

    Attributes:
        kind: "linear" (all frequencies divided by `factor`) or "llama3" (the Llama 3.1
            wavelength-dependent blend of scaled and unscaled frequencies).
        factor: the scaling factor.
        low_freq_factor: llama3 only.
        high_freq_factor: llama3 only.
        original_max_position_embeddings: llama3 only: the context length the model was
            trained with before scaling.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, described family-independently.

    Attributes:
        family: the Hugging Face family the weights came from (decides names on save).
        vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff: sizes.
        max_position_embeddings: the longest sequence the model accepts.
        norm: "layernorm" (with bias, GPT-2) or "rmsnorm".
        norm_eps: the epsilon inside the norm.
        norm_weight_offset: 1.0 for Gemma's `(1 + w)` RMSNorm, else 0.0.
        norm_scale_in_float32: RMSNorm multiplies by its weight in float32 and then casts
            (Gemma, OLMo 2); else it casts first and multiplies in the input's dtype (Llama).
        activation: one of `ACTIVATIONS`.
        gated_mlp: SwiGLU/GeGLU (gate, up, down) if True, else a plain up/down MLP.
        positional: "rope" or "learned".
        rope_theta: the RoPE base.
        rope_scaling: an optional `RopeScaling` (of the full-attention blocks only when
            `sliding_rope_theta` is set).
        sliding_rope_theta: the RoPE base of the sliding-window blocks when it differs from
            the full-attention blocks' (Gemma 3: 10,000 local, 1,000,000 global); None = the
            same tables for every block.
        attention_scale: the factor on query-key products; None = head_dim ** -0.5 (Gemma 3:
            query_pre_attn_scalar ** -0.5).
        qk_norm: RMSNorm on queries and keys before the rotary embedding (`self_attn.q_norm`,
            `self_attn.k_norm`): "head_dim" normalizes each head (Gemma 3, Qwen3; weight
            `[head_dim]`), "projection" the whole projection (OLMo 2; weight `[heads,
            head_dim]`); None: no such norms.
        norm_layout: where a block's residual-width norms stand (Hugging Face's names):
            "pre": `input_layernorm` before attention, `post_attention_layernorm` before the
            MLP (Llama, GPT-2); "sandwich": also on what each adds to the stream,
            `input_layernorm` -> attention -> `post_attention_layernorm` (+), then
            `pre_feedforward_layernorm` -> MLP -> `post_feedforward_layernorm` (+) (Gemma 2
            and 3); "post": only on what each adds, attention -> `post_attention_layernorm`
            (+), MLP -> `post_feedforward_layernorm` (+) (OLMo 2).
        attn_logit_softcap: attention scores become `cap * tanh(scores / cap)` before the
            mask (Gemma 2); None: no capping.
        final_logit_softcap: the same on the output logits (Gemma 2); None: no capping.
        qkv_bias, o_bias, mlp_bias: which linear maps carry a bias.
        tie_embeddings: the output projection is the transposed input embedding.
        scale_embeddings: multiply embeddings by sqrt(d_model) (Gemma).
        sliding_windows: per layer, the attention window (None = full causal attention).
        dtype: the dtype the checkpoint stores its parameters in.
        metadata: harmless Hugging Face config entries (token ids and the like) as a JSON
            string, kept so that saving writes them back.

    Example:
        >>> cfg = ModelConfig.tiny("llama")
        >>> cfg.n_heads // cfg.n_kv_heads
        2
    """

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_position_embeddings: int
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0
    activation: str = "silu"
    gated_mlp: bool = True
    positional: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    scale_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    sliding_rope_theta: float | None = None
    attention_scale: float | None = None
    qk_norm: QKNorm | None = None
    norm_layout: NormLayout = "pre"
    norm_scale_in_float32: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    dtype: str = "float32"
    metadata: str = "{}"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.norm_layout not in get_args(NormLayout):
            raise ValueError(f"norm_layout must be one of {get_args(NormLayout)}, "
                             f"got {self.norm_layout!r}")
        if self.qk_norm not in (None, *get_args(QKNorm)):
            raise ValueError(f"qk_norm must be None or one of {get_args(QKNorm)}, "
                             f"got {self.qk_norm!r}")
        if self.norm_weight_offset and not self.norm_scale_in_float32:
            raise ValueError("norm_weight_offset (Gemma's 1 + w) is applied in float32: set "
                             "norm_scale_in_float32=True")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.n_layers)
        if len(self.sliding_windows) != self.n_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.n_layers} layers"
            )

    @property
    def queries_per_kv_head(self) -> int:
        """How many query heads share one key/value head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def block_norms(self) -> tuple[str, ...]:
        """The names of a block's residual-width norms, in the order the block applies them.

        Example:
            >>> ModelConfig.tiny("llama").block_norms
            ('input_layernorm', 'post_attention_layernorm')
            >>> ModelConfig.tiny("olmo2").block_norms
            ('post_attention_layernorm', 'post_feedforward_layernorm')
        """
        if self.norm_layout == "sandwich":
            return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm")
        if self.norm_layout == "post":
            return ("post_attention_layernorm", "post_feedforward_layernorm")
        return ("input_layernorm", "post_attention_layernorm")

    @property
    def pre_attention_norm(self) -> str | None:
        """The name of the norm before attention (None when the block has none: OLMo 2)."""
        return None if self.norm_layout == "post" else "input_layernorm"

    @property
    def pre_mlp_norm(self) -> str | None:
        """The name of the norm before the MLP: `post_attention_layernorm` (pre-norm blocks),
        `pre_feedforward_layernorm` (sandwich), None (post-norm blocks)."""
        return {"pre": "post_attention_layernorm", "sandwich": "pre_feedforward_layernorm",
                "post": None}[self.norm_layout]

    @property
    def output_norms(self) -> tuple[str, str] | None:
        """The norms on what attention and the MLP add to the stream (sandwich and post-norm
        blocks), or None."""
        if self.norm_layout == "pre":
            return None
        return ("post_attention_layernorm", "post_feedforward_layernorm")

    @property
    def jnp_dtype(self) -> jnp.dtype:
        """The parameter dtype as a jax dtype."""
        return DTYPES[self.dtype]

    def replace(self, **changes: object) -> ModelConfig:
        """Returns a copy with some fields changed.

        Example:
            >>> ModelConfig.tiny("gpt2").replace(n_layers=3).n_layers
            3
        """
        if "n_layers" in changes and "sliding_windows" not in changes:
            changes["sliding_windows"] = ()
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, family: Family = "llama", **overrides: object) -> ModelConfig:
        """A small config of the given family, for tests and examples.

        Arguments:
            family: one of `FAMILIES`.
            **overrides: any field to change.

        Returns:
            A `ModelConfig` with 2 layers, d_model 32, 4 heads and vocabulary 128, shaped the
            way the family shapes its models (GQA for Llama/Qwen2/Qwen3/Mistral/Phi-3/Gemma 2,
            MQA for Gemma and Gemma 3, MHA for GPT-2 and OLMo 2).

        Example:
            >>> ModelConfig.tiny("gemma").n_kv_heads
            1
        """
        common = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, head_dim=8, d_ff=64,
                      max_position_embeddings=64)
        per_family: dict[str, dict[str, object]] = {
            "gpt2": dict(n_kv_heads=4, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
                         gated_mlp=False, positional="learned", qkv_bias=True, o_bias=True,
                         mlp_bias=True, tie_embeddings=True),
            "llama": dict(n_kv_heads=2),
            "qwen2": dict(n_kv_heads=2, qkv_bias=True, tie_embeddings=True),
            "mistral": dict(n_kv_heads=2),
            "gemma": dict(n_kv_heads=1, head_dim=16, norm_weight_offset=1.0, norm_scale_in_float32=True,
                          activation="gelu_tanh", tie_embeddings=True, scale_embeddings=True),
            "gemma3_text": dict(n_kv_heads=1, head_dim=16, norm_weight_offset=1.0,
                                norm_scale_in_float32=True, activation="gelu_tanh",
                                tie_embeddings=True, scale_embeddings=True,
                                sliding_rope_theta=10000.0, rope_theta=1e6,
                                attention_scale=24**-0.5, qk_norm="head_dim",
                                norm_layout="sandwich"),
            "qwen3": dict(n_kv_heads=2, qk_norm="head_dim", tie_embeddings=True),
            "gemma2": dict(n_kv_heads=2, head_dim=16, norm_weight_offset=1.0,
                           norm_scale_in_float32=True, activation="gelu_tanh",
                           tie_embeddings=True, scale_embeddings=True, attention_scale=24**-0.5,
                           norm_layout="sandwich", attn_logit_softcap=50.0,
                           final_logit_softcap=30.0),
            "olmo2": dict(n_kv_heads=4, qk_norm="projection", norm_layout="post",
                          norm_scale_in_float32=True),
            "phi3": dict(n_kv_heads=2),
        }
        fields = {**common, **per_family[family], **overrides}
        if family in ("gemma2", "gemma3_text") and "sliding_windows" not in overrides:
            # every other block slides, the first one first
            fields["sliding_windows"] = tuple(None if i % 2 else 4 for i in range(int(fields["n_layers"])))
        return cls(family=family, **fields)  # type: ignore[arg-type]


Params = dict  # a nested dict of arrays; see `param_shapes` for its exact structure


def param_shapes(config: ModelConfig, dtype: jnp.dtype | None = None) -> Params:
    """The structure of a model's params pytree, with `jax.ShapeDtypeStruct` leaves.

    Linear maps are stored input-major (`x @ W`), with head axes exposed:
    q: `[d_model, n_heads, head_dim]`, k/v: `[d_model, n_kv_heads, head_dim]`,
    o: `[n_heads, head_dim, d_model]`, gate/up: `[d_model, d_ff]`, down: `[d_ff, d_model]`,
    embed_tokens: `[vocab, d_model]`, lm_head (untied only): `[d_model, vocab]`.

    Arguments:
        config: the architecture.
        dtype: leaf dtype (default: the config's dtype).

    Returns:
        `{"embed_tokens": {"weight"}, ["embed_positions": {"weight"}], "layers": [per-layer
        dicts], "norm": {...}, ["lm_head": {"weight"}]}` of `jax.ShapeDtypeStruct`.

    Example:
        >>> shapes = param_shapes(ModelConfig.tiny("llama"))
        >>> shapes["layers"][0]["self_attn"]["k_proj"]["weight"].shape
        (32, 2, 8)
    """
    dt = jnp.dtype(dtype) if dtype is not None else config.jnp_dtype
    c = config

    def leaf(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(shape), dt)

    def norm() -> dict[str, jax.ShapeDtypeStruct]:
        out = {"weight": leaf(c.d_model)}
        if c.norm == "layernorm":
            out["bias"] = leaf(c.d_model)
        return out

    def linear(shape: tuple[int, ...], bias_shape: tuple[int, ...], has_bias: bool) -> dict:
        out = {"weight": leaf(*shape)}
        if has_bias:
            out["bias"] = leaf(*bias_shape)
        return out

    def layer() -> dict:
        attn = {
            "q_proj": linear((c.d_model, c.n_heads, c.head_dim), (c.n_heads, c.head_dim), c.qkv_bias),
            "k_proj": linear((c.d_model, c.n_kv_heads, c.head_dim), (c.n_kv_heads, c.head_dim),
                             c.qkv_bias),
            "v_proj": linear((c.d_model, c.n_kv_heads, c.head_dim), (c.n_kv_heads, c.head_dim),
                             c.qkv_bias),
            "o_proj": linear((c.n_heads, c.head_dim, c.d_model), (c.d_model,), c.o_bias),
        }
        if c.qk_norm == "head_dim":
            attn.update(q_norm={"weight": leaf(c.head_dim)}, k_norm={"weight": leaf(c.head_dim)})
        elif c.qk_norm == "projection":
            attn.update(q_norm={"weight": leaf(c.n_heads, c.head_dim)},
                        k_norm={"weight": leaf(c.n_kv_heads, c.head_dim)})
        mlp = {
            "up_proj": linear((c.d_model, c.d_ff), (c.d_ff,), c.mlp_bias),
            "down_proj": linear((c.d_ff, c.d_model), (c.d_model,), c.mlp_bias),
        }
        if c.gated_mlp:
            mlp = {"gate_proj": linear((c.d_model, c.d_ff), (c.d_ff,), c.mlp_bias), **mlp}
        if c.norm_layout == "sandwich":
            return {"input_layernorm": norm(), "self_attn": attn,
                    "post_attention_layernorm": norm(), "pre_feedforward_layernorm": norm(),
                    "mlp": mlp, "post_feedforward_layernorm": norm()}
        if c.norm_layout == "post":
            return {"self_attn": attn, "post_attention_layernorm": norm(), "mlp": mlp,
                    "post_feedforward_layernorm": norm()}
        return {"input_layernorm": norm(), "self_attn": attn, "post_attention_layernorm": norm(),
                "mlp": mlp}

    tree: Params = {"embed_tokens": {"weight": leaf(c.vocab_size, c.d_model)}}
    if c.positional == "learned":
        tree["embed_positions"] = {"weight": leaf(c.max_position_embeddings, c.d_model)}
    tree["layers"] = [layer() for _ in range(c.n_layers)]
    tree["norm"] = norm()
    if not c.tie_embeddings:
        tree["lm_head"] = {"weight": leaf(c.d_model, c.vocab_size)}
    return tree


def init_params(config: ModelConfig, key: jax.Array, scale: float = 0.02,
                dtype: jnp.dtype | None = None) -> Params:
    """Random params for a config: normal(0, scale) weights, unit norms, zero biases.

    Arguments:
        config: the architecture.
        key: a `jax.random` key.
        scale: standard deviation of the weights.
        dtype: leaf dtype (default: the config's dtype).

    Returns:
        A params pytree shaped as `param_shapes(config)`.

    Example:
        >>> import jax
        >>> p = init_params(ModelConfig.tiny("gpt2"), jax.random.key(0))
        >>> p["embed_positions"]["weight"].shape
        (64, 32)
    """
    shapes = param_shapes(config, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, spec), k in zip(leaves, keys):
        names = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        is_norm = any(isinstance(n, str) and n.endswith("norm") for n in names)
        if names[-1] == "bias":
            out.append(jnp.zeros(spec.shape, spec.dtype))
        elif is_norm:
            base = 0.0 if config.norm_weight_offset else 1.0
            out.append(jnp.full(spec.shape, base, spec.dtype))
        else:
            out.append((scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(spec.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def count_params(params: Params) -> int:
    """The number of scalars in a params pytree.

    Example:
        >>> count_params({"a": np.zeros((2, 3))})
        6
    """
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
