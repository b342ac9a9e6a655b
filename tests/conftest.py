"""Shared test fixtures: the golden fixtures' folder, and random pairs.

XLA's flags for the suite are set in the repository's top-level `conftest.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
from golden import FIXTURES

import jaxpatch
from jaxpatch.examples import random_pair


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def pair() -> Callable[..., tuple[jaxpatch.Model, jaxpatch.Model]]:
    """`pair(family, **overrides)`: a tiny random base/donor pair (`random_pair`; weights of
    scale 0.2, an independent donor unless `perturbation` is given)."""

    def make(family: str = "llama", **overrides: Any) -> tuple[jaxpatch.Model, jaxpatch.Model]:
        return random_pair(family, **overrides)  # type: ignore[arg-type]

    return make

