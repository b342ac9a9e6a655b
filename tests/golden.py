"""The golden fixtures: tiny checkpoints and the transformers outputs recorded for them
(`scripts/make_fixtures.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
FLOAT32_FIXTURES = ["gpt2", "llama-gqa", "llama-mqa", "qwen2", "mistral", "gemma", "gemma3", "qwen3",
                    "gemma2", "olmo2", "phi3", "llama-bf16"]


def reference(name: str) -> dict[str, np.ndarray]:
    """The transformers outputs recorded for fixture `name` (no pickle)."""
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as data:
        return dict(data)
