"""pytest set-up shared by the tests and the docstring examples.

The suite compiles hundreds of small programs and runs each a few times, so XLA's CPU backend
skips LLVM's optimization of the generated code (`--xla_backend_optimization_level=0`): the
suite takes a fifth less time and the same numbers pass (the golden-fixture parity included).
Two fake CPU devices are there for sharding tests. An `XLA_FLAGS` set by the caller replaces
both flags. The persistent compilation cache is off unless a test turns it on, and the Hugging
Face hub is off (`HF_HUB_OFFLINE=1`): nothing in the suite reaches the network.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXPATCH_COMPILE_CACHE", "0")  # hermetic: tests that use it say so
# No test touches the network: a hub name resolves from a cache a test builds, or fails.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

FIXTURES = Path(__file__).parent / "tests" / "fixtures"
_NEEDS_EVALUATION = ("jaxpatch.studies.report.", "jaxpatch.studies.evaluate.evaluate")


@functools.lru_cache(maxsize=1)
def _module_evaluation() -> object:
    """The shipped planted pair evaluated at module granularity (once per session, ~15 s)."""
    from jaxpatch.studies.evaluate import default_pair_dir, evaluate, load_planted

    return evaluate(load_planted(default_pair_dir()), granularities=("module",))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs() -> Iterator[None]:
    """Drops every compiled program after each test module. Each one holds memory mappings of
    its machine code, and a whole suite's worth (thousands of small programs) would exceed the
    kernel's per-process limit on mappings (`vm.max_map_count`, 65530), where XLA aborts."""
    yield
    import jax

    from jaxpatch.engine import programs

    programs._COMPILED.clear()
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _doctest_names(request: pytest.FixtureRequest, doctest_namespace: dict, tmp_path: Path) -> None:
    """Docstring examples run with `jaxpatch`, `jax`, `jnp`, `np`, the example pair (`cfg`,
    `base`, `donor`, `batch`; see `jaxpatch.examples`) and `pair`, it prepared
    (`jaxpatch.prepare`), `fixtures` (the golden checkpoints'
    folder) and `tmp` (an empty folder of their own) in scope; the report's and evaluation's
    examples also get `ev`, the shipped planted pair evaluated at module granularity."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxpatch
    from jaxpatch.examples import example_pair

    example = example_pair()
    doctest_namespace.update(jaxpatch=jaxpatch, jax=jax, jnp=jnp, np=np, cfg=example.config,
                             base=example.base, donor=example.donor, batch=example.batch,
                             pair=jaxpatch.prepare(example.base, example.donor, example.batch),
                             fixtures=FIXTURES, tmp=tmp_path)
    if request.node.name.startswith(_NEEDS_EVALUATION):
        doctest_namespace["ev"] = _module_evaluation()
