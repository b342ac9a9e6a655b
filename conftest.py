"""pytest set-up shared by the tests and the docstring examples.

The suite compiles hundreds of small programs and runs each a few times, so XLA's CPU backend
skips LLVM's optimization of the generated code (`--xla_backend_optimization_level=0`): the
suite takes a fifth less time and the same numbers pass (the golden-fixture parity included).
Two fake CPU devices are there for sharding tests. An `XLA_FLAGS` set by the caller replaces
both flags.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    """Docstring examples run with `jaxpatch`, `jax`, `jnp`, `np` and the example pair
    (`cfg`, `base`, `donor`, `batch`; see `jaxpatch.examples`) in scope."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxpatch
    from jaxpatch.examples import example_pair

    pair = example_pair()
    doctest_namespace.update(jaxpatch=jaxpatch, jax=jax, jnp=jnp, np=np, cfg=pair.config,
                             base=pair.base, donor=pair.donor, batch=pair.batch)
