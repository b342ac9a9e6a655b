"""Generates the golden fixtures in tests/fixtures from Hugging Face transformers.

Each variant is a tiny random model built and saved by transformers itself (`save_pretrained`,
safetensors), a `tokenizer.json` made with the tokenizers library, and `<name>.npz` holding a
right-padded token batch with transformers' logits and hidden states for it. The default test
suite compares jaxpatch against these files, so it needs no torch.

`generation.npz` holds transformers' greedy `generate` (its own key/value cache, each prompt
alone, no stopping at an end token) from every float32 variant's folder: the tokens jaxpatch's
cached generation must pick.

Needs the `reference` extra:  pip install -e ".[reference]"
Run:                          python scripts/make_fixtures.py [--out tests/fixtures]
                              python scripts/make_fixtures.py --generation-only
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 96
SEQ = 10
LENGTHS = (10, 7, 4)  # one full row and two right-padded ones

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # MHA, learned positions, fused c_attn, tied embeddings.
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
                         eos_token_id=1)),
    # GQA, untied, Llama-3 rope scaling exercising kept, blended and scaled frequencies.
    "llama-gqa": ("llama", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    # MQA, tied, attention and MLP biases, linear rope scaling.
    "llama-mqa": ("llama", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    # GQA with q/k/v biases, tied, sliding window on the second layer only.
    "qwen2": ("qwen2", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # GQA, untied, sliding window shorter than the sequence.
    "mistral": ("mistral", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        tie_word_embeddings=False)),
    # MHA with head_dim != d_model / n_heads, (1 + w) norm, scaled embeddings, GeGLU, tied.
    "gemma": ("gemma", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=64)),
    # Stored in bfloat16 (GQA Llama).
    "llama-bf16": ("llama", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    # Gemma 3: q/k norms, four norms per block, query_pre_attn_scalar != head_dim, sliding
    # windows (4, shorter than the sequence) in blocks 0 and 2 with their own rope base, full
    # attention in block 1 with linear rope scaling, GQA, tied.
    "gemma3": ("gemma3_text", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0,
                                            "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    # Qwen3: q/k norms over each head, no biases, head_dim != d_model / n_heads, GQA, tied,
    # sliding window (4) on the second block only.
    "qwen3": ("qwen3", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # Gemma 2: attention and final logit softcapping (small caps, so that they bite), sandwich
    # norms, sliding windows (4) in blocks 0 and 2, query_pre_attn_scalar != head_dim, GQA, tied.
    "gemma2": ("gemma2", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
        sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    # OLMo 2: norms after attention and the MLP only, q/k norms over the whole projection, GQA,
    # untied.
    "olmo2": ("olmo2", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    # Phi-3: fused qkv_proj and gate_up_proj, GQA, untied, a sliding window (4) on every block.
    "phi3": ("phi3", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
}

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "weight patching copies selected weights from a donor model into a base model",
    "a patch is a pytree of coefficients and patching is a tree merge",
    "sources aggregators and executors form a hierarchy of components",
] * 4


def make_tokenizer() -> Any:
    """A small character-level BPE tokenizer with exactly VOCAB entries or fewer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    assert tokenizer.get_vocab_size() <= VOCAB
    return tokenizer


def randomize(model: Any, seed: int) -> None:
    """Gives every parameter a non-trivial random value so that mistakes show in the logits."""
    import torch  # pyright: ignore[reportMissingImports]  (the reference extra)

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or ".ln_" in name:
                is_gemma = model.config.model_type in ("gemma", "gemma2", "gemma3_text")
                p.copy_(0.1 * noise + (0.0 if is_gemma or name.endswith("bias") else 1.0))
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.3)


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(LENGTHS), SEQ), np.int64)
    mask = np.zeros((len(LENGTHS), SEQ), np.int64)
    for row, length in enumerate(LENGTHS):
        tokens[row, :length] = rng.integers(1, VOCAB, length)
        mask[row, :length] = 1
    return tokens, mask


def build(name: str, family: str, kwargs: dict[str, Any], out: Path, seed: int) -> None:
    import torch  # pyright: ignore[reportMissingImports]  (the reference extra)
    import transformers  # pyright: ignore[reportMissingImports]

    config_class = transformers.AutoConfig.for_model(family).__class__
    config = config_class(vocab_size=VOCAB, **kwargs)  # pyright: ignore[reportCallIssue]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model, seed)
    bf16 = name.endswith("bf16")
    if bf16:
        model = model.to(torch.bfloat16)
    model.eval()
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save(str(folder / "tokenizer.json"))

    # The references come from transformers loading the saved folder, as a user would.
    tokens, mask = batch(seed)
    reference: dict[str, np.ndarray] = {"tokens": tokens, "attention_mask": mask}
    inputs = dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    with torch.no_grad():
        if bf16:
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
            reference["logits_bf16"] = reloaded(**inputs).logits.float().numpy()
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
        result = reloaded(**inputs, output_hidden_states=True)
    reference["logits"] = result.logits.float().numpy()
    # hidden_states[i] is the residual stream before block i; the last has the final norm.
    reference["residuals"] = np.stack([h.float().numpy() for h in result.hidden_states[1:-1]])
    np.savez_compressed(out / f"{name}.npz", **reference)  # pyright: ignore[reportArgumentType]
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {folder}")


GENERATED = 12  # new tokens per prompt: longer than every sliding window of the variants


def generation_reference(folder: Path, seed: int) -> np.ndarray:
    """transformers' greedy continuations of the variant's prompts, each prompt alone (no
    padding), `GENERATED` new tokens each: int `[prompts, GENERATED]`."""
    import torch  # pyright: ignore[reportMissingImports]  (the reference extra)
    import transformers  # pyright: ignore[reportMissingImports]

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # else the saved default stops at it
    tokens, mask = batch(seed)
    rows = []
    for row, length in zip(tokens, mask.sum(1)):
        ids = torch.tensor(row[:length][None])
        settings = transformers.GenerationConfig(do_sample=False, max_new_tokens=GENERATED,
                                                 eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(  # pyright: ignore[reportAttributeAccessIssue]
                ids, attention_mask=torch.ones_like(ids), generation_config=settings)
        new = out[0, length:].numpy()
        assert len(new) == GENERATED, f"{folder.name}: generation stopped after {len(new)} tokens"
        rows.append(new)
    return np.stack(rows)


def write_generation(out: Path) -> None:
    """`generation.npz`: the greedy continuations of every float32 variant, with its prompts."""
    generated = {}
    for seed, name in enumerate(VARIANTS):
        if not name.endswith("bf16"):
            generated[name] = generation_reference(out / name, seed)
            print(f"{name}: generated {generated[name].shape}")
    np.savez_compressed(out / "generation.npz", **generated)  # pyright: ignore[reportArgumentType]


CONFIG_CLASSES = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "mistral": "MistralConfig", "phi3": "Phi3Config",
                  "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
                  "gemma3_text": "Gemma3TextConfig", "olmo2": "Olmo2Config"}


def write_default_configs(out: Path) -> None:
    """`default_configs.json`: every supported family's default config as the installed
    transformers holds it (`to_dict()`) and as it writes it (`save_pretrained`), so the tests
    check that a config transformers writes today is read."""
    import tempfile

    import transformers  # pyright: ignore[reportMissingImports]

    configs: dict[str, dict[str, Any]] = {}
    for family, class_name in CONFIG_CLASSES.items():
        config = getattr(transformers, class_name)()
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            saved = json.loads((Path(folder) / "config.json").read_text())
        configs[family] = {"to_dict": json.loads(json.dumps(config.to_dict(), default=str)),
                           "saved": saved}
    (out / "default_configs.json").write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")
    print(f"default configs of {len(configs)} families -> {out / 'default_configs.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "tests" / "fixtures")
    parser.add_argument("--only", action="append", choices=list(VARIANTS),
                        help="rebuild only this variant (repeatable; default: all)")
    parser.add_argument("--generation-only", action="store_true",
                        help="only regenerate generation.npz from the variants' folders")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers  # pyright: ignore[reportMissingImports]  (the reference extra)

    if not args.generation_only:
        for seed, (name, (family, kwargs)) in enumerate(VARIANTS.items()):
            if args.only is None or name in args.only:
                build(name, family, kwargs, args.out, seed)
    write_generation(args.out)
    write_default_configs(args.out)
    (args.out / "VERSIONS.json").write_text(json.dumps(
        {"transformers": transformers.__version__, "torch": __import__("torch").__version__},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
