"""jaxpatch inside a user's training loop: where a newly learned behavior lives, step by step.

The user's own Flax NNX model (jaxpatch did not build it: no config, no families) first learns
task A (is `x0 > 0`), then is fine-tuned with optax on task B (is `x1 > 0`) with its `hidden` and
`out` layers trainable. Every `every` steps, one jitted and vmapped jaxpatch call patches each
layer of the current checkpoint, alone, into the checkpoint fine-tuning started from and
measures how much of task B's margin that layer carries (0: none, 1: all of it). The rows over
training are the behavior's location as it forms: on the default run, early on either layer
alone carries most of the new margin (0.98 and 0.78 at step 25); by step 300 each alone carries
about a fifth, and the behavior lives in the two together.

    python -m experiments.track_training --out tracking.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpatch import apply
from jaxpatch.adapters import tree_patch

__all__ = ["Net", "Tracking", "pure_forward", "margin", "layer_recovery", "train_and_track", "main"]

LAYERS: tuple[str, ...] = ("first", "hidden", "out")


class Net(nnx.Module):
    """The user's model: a three-layer MLP with two logits."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.first = nnx.Linear(8, 32, rngs=rngs)
        self.hidden = nnx.Linear(32, 32, rngs=rngs)
        self.out = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(jax.nn.relu(self.first(x)))))


def pure_forward(model: nnx.Module) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """The model as a pure function of a plain params dict, and its current params.

    Returns:
        `(run, params)`: `run(params, x)` gives the logits; `params` is a nested dict of arrays
        (what jaxpatch patches).

    Example:
        >>> run, params = pure_forward(Net(nnx.Rngs(0)))
        >>> run(params, jnp.ones((3, 8))).shape, sorted(params)
        ((3, 2), ['first', 'hidden', 'out'])
    """
    graphdef, state = nnx.split(model)

    def run(params: Any, x: jax.Array) -> jax.Array:
        fresh = jax.tree_util.tree_map(lambda v: v, state)  # a new container, never the original
        nnx.replace_by_pure_dict(fresh, params)
        return nnx.merge(graphdef, fresh)(x)

    return run, nnx.to_pure_dict(state)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean logit margin of the right class over the other (the behavior's score)."""
    right = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.mean(right - jnp.take_along_axis(logits, 1 - labels[:, None], axis=1)[:, 0])


def layer_recovery(run: Callable[[Any, jax.Array], jax.Array], start: Any, current: Any,
                   x: jax.Array, labels: jax.Array) -> np.ndarray:
    """For each layer, the share of the behavior's change from `start` to `current` that the
    layer's weights alone carry: `start` with that layer from `current`, in one jitted vmap.

    Example:
        >>> run, p = pure_forward(Net(nnx.Rngs(0)))
        >>> q = {**p, "hidden": jax.tree_util.tree_map(lambda a: a * 2, p["hidden"])}
        >>> x = jax.random.normal(jax.random.key(0), (64, 8))
        >>> layer_recovery(run, p, q, x, (x[:, 1] > 0).astype(jnp.int32)).round(3).tolist()
        [0.0, 1.0, 0.0]
    """
    alphas = [tree_patch(start, name) for name in LAYERS]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *alphas)
    scores = _patched_margins(run, stacked, start, current, x, labels)
    low, high = (float(margin(run(p, x), labels)) for p in (start, current))
    return (np.asarray(scores) - low) / (high - low)


@functools.partial(jax.jit, static_argnums=0)
def _patched_margins(run: Callable[[Any, jax.Array], jax.Array], alphas: Any, start: Any,
                     current: Any, x: jax.Array, labels: jax.Array) -> jax.Array:
    return jax.vmap(lambda alpha: margin(run(apply(alpha, start, current), x), labels))(alphas)


@dataclasses.dataclass
class Tracking:
    """What `train_and_track` measured.

    Attributes:
        steps: the fine-tuning steps at which the location was measured.
        recovery: `[len(steps), 3]`: each layer's share of the behavior (`layer_recovery`).
        accuracy_a, accuracy_b: the final model's accuracy on tasks A and B.
        accuracy_b_before: task B accuracy before fine-tuning.
    """

    steps: list[int]
    recovery: np.ndarray
    accuracy_a: float
    accuracy_b: float
    accuracy_b_before: float


def _accuracy(logits: jax.Array, labels: jax.Array) -> float:
    return float(jnp.mean(jnp.argmax(logits, axis=1) == labels))


def _is(value: bool, _: Any) -> bool:
    return value


def _fit(run: Callable[[Any, jax.Array], jax.Array], params: Any, label_of: Callable[[jax.Array], jax.Array],
         steps: int, trainable: Sequence[str], key: jax.Array, every: int = 0,
         measure: Callable[[int, Any], None] | None = None) -> Any:
    """Adam on cross-entropy for `label_of(x)`, updating only the `trainable` layers."""
    mask = {name: jax.tree_util.tree_map(functools.partial(_is, name in trainable), params[name])
            for name in params}
    optimizer = optax.masked(optax.adam(1e-2), mask)
    state = optimizer.init(params)

    @jax.jit
    def step(params: Any, state: Any, x: jax.Array) -> tuple[Any, Any]:
        def loss(p: Any) -> jax.Array:
            logits = run(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, label_of(x)).mean()

        grads = jax.grad(loss)(params)
        grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, mask)  # frozen layers stay put
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, jax.random.normal(jax.random.fold_in(key, i), (64, 8)))
        if measure is not None and every and (i + 1) % every == 0:
            measure(i + 1, params)
    return params


def task_a(x: jax.Array) -> jax.Array:
    """Task A's labels: is `x0 > 0`."""
    return (x[:, 0] > 0).astype(jnp.int32)


def task_b(x: jax.Array) -> jax.Array:
    """Task B's labels: is `x1 > 0`."""
    return (x[:, 1] > 0).astype(jnp.int32)


def train_and_track(steps: int = 300, every: int = 25, seed: int = 0) -> Tracking:
    """Pretrains on task A, fine-tunes on task B with `hidden` and `out` trainable, and measures
    the location of task B's behavior every `every` steps.

    Example:
        >>> t = train_and_track(steps=50, every=25)
        >>> t.steps, t.recovery.shape, bool((t.recovery[:, 0] == 0).all())  # `first` is frozen
        ([25, 50], (2, 3), True)
    """
    run, params = pure_forward(Net(nnx.Rngs(seed)))
    key = jax.random.key(seed)
    params = _fit(run, params, task_a, 300, LAYERS, jax.random.fold_in(key, 1))
    probe = jax.random.normal(jax.random.fold_in(key, 2), (512, 8))
    start = params
    rows: list[np.ndarray] = []
    measured: list[int] = []

    def measure(step: int, current: Any) -> None:
        measured.append(step)
        rows.append(layer_recovery(run, start, current, probe, task_b(probe)))

    final = _fit(run, params, task_b, steps, ("hidden", "out"), jax.random.fold_in(key, 3), every, measure)
    return Tracking(measured, np.stack(rows), _accuracy(run(final, probe), task_a(probe)),
                    _accuracy(run(final, probe), task_b(probe)), _accuracy(run(start, probe), task_b(probe)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.track_training",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default="tracking.png", help="the plot to write (default tracking.png)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    args = p.parse_args(argv)
    t = train_and_track(args.steps, args.every)
    print(f"task B accuracy {t.accuracy_b_before:.2f} -> {t.accuracy_b:.2f} (task A now {t.accuracy_a:.2f})")
    print("step  " + "  ".join(f"{n:>7}" for n in LAYERS))
    for step, row in zip(t.steps, t.recovery):
        print(f"{step:>4}  " + "  ".join(f"{v:7.3f}" for v in row))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxpatch.runs.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, name in enumerate(LAYERS):
        ax.plot(t.steps, t.recovery[:, i], "o-", label=name)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("share of task B carried alone")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
