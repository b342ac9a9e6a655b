"""Every program jaxpatch compiles rounds each operation's result to the dtype it is written in.

By default XLA may keep a fused chain of bfloat16 (or float16) operations in float32 and round
only at the end (`xla_allow_excess_precision`). Which chains it fuses depends on the program, so
two programs that compute the same model (a sweep's block-local program and the plain forward,
the prefix pass and a patched run) round differently, and in bfloat16 that difference is as
large as the effect of patching one module of a lightly fine-tuned pair. With excess precision
off, a jitted program rounds exactly as the same code run operation by operation (and as
PyTorch does), so every program that computes the same thing gets the same bits.

Float32 programs are unaffected. jaxpatch's own programs are compiled with `jit`. XLA takes
options for a whole program only, so a jaxpatch function called inside a caller's `jax.jit`
(or `vmap`, `grad`) becomes part of the caller's program and rounds as that program does; a
caller who wants the same bits can pass `COMPILER_OPTIONS` to their own `jax.jit`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax._src.core import trace_state_clean  # no public equivalent: "is anything tracing?"

__all__ = ["COMPILER_OPTIONS", "Jitted", "jit"]

COMPILER_OPTIONS: dict[str, Any] = {"xla_allow_excess_precision": False}
"""XLA options for every program jaxpatch compiles."""

class Jitted:
    """A function jitted twice: with `COMPILER_OPTIONS` for calls at the top level, and as an
    ordinary nested `jax.jit` for calls inside another trace (XLA takes options per program).
    Wraps the function (name, docstring), and lowers with the options.
    """

    def __init__(self, fun: Callable[..., Any], **options: Any) -> None:
        functools.update_wrapper(self, fun)
        self._top = jax.jit(fun, compiler_options=COMPILER_OPTIONS, **options)
        self._nested = jax.jit(fun, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self._top if trace_state_clean() else self._nested)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """`jax.jit(...).lower` of the top-level program (compile it with `.compile()`)."""
        return self._top.lower(*args, **kwargs)


def jit(fun: Callable[..., Any], **options: Any) -> Jitted:
    """`jax.jit(fun, **options)`, compiled with `COMPILER_OPTIONS` when called at the top level
    (inside another trace it is an ordinary nested `jax.jit`).

    Arguments:
        fun: the function to compile.
        **options: `jax.jit`'s keyword arguments (`static_argnums`, `donate_argnums`, ...).

    Returns:
        The jitted function (a `Jitted`).

    Example:
        >>> double = jit(lambda x: (x * 3 + 1).astype(jnp.bfloat16) * 2)
        >>> double(jnp.ones(2, jnp.bfloat16)).tolist()
        [8.0, 8.0]
        >>> jax.jit(lambda x: double(x) + 1)(jnp.ones(2)).tolist()  # inside a caller's program
        [9.0, 9.0]
    """
    return Jitted(fun, **options)
