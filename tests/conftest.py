"""Shared test set-up: two fake CPU devices (for sharding tests) and the golden fixtures.

The tests compile hundreds of small programs and run each a few times, so XLA's CPU backend
skips LLVM's optimization of the generated code here (`--xla_backend_optimization_level=0`): the
suite takes a fifth less time and the same numbers pass (the golden-fixture parity included).
An `XLA_FLAGS` set by the caller replaces both flags.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
FLOAT32_FIXTURES = ["gpt2", "llama-gqa", "llama-mqa", "qwen2", "mistral", "gemma", "llama-bf16"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def reference(name: str) -> dict[str, np.ndarray]:
    """The transformers outputs recorded for fixture `name` (no pickle)."""
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as data:
        return dict(data)
