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


@pytest.fixture(scope="session")
def donor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A donor for the llama-gqa fixture: every weight perturbed."""
    import dataclasses

    import jax

    base = jaxpatch.load(FIXTURES / "llama-gqa")
    leaves, treedef = jax.tree_util.tree_flatten(base.params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    moved = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    folder = tmp_path_factory.mktemp("donor") / "donor"
    jaxpatch.save(dataclasses.replace(base, params=jax.tree_util.tree_unflatten(treedef, moved)), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_instruct_build() -> dict[str, Any]:
    """The instruction-pair builder's result on a tiny random Gemma 3 (`tiny_chat`): three
    training steps, built once for the tests that read it (do not modify it)."""
    from tiny_chat import RELAXED, tiny_base

    from experiments.instruct_pair import build

    return build(RELAXED, tiny_base(), log=lambda line: None)
