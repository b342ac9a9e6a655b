"""jaxpatch inside a user's training loop: jit, vmap and grad through the public patch API on a
Flax NNX model jaxpatch did not build, and the runnable tracking example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.track_training import LAYERS, Net, margin, pure_forward, task_b, train_and_track
from jaxpatch import apply
from jaxpatch.adapters import tree_patch


def _pair():
    run, start = pure_forward(Net(nnx.Rngs(0)))
    _, other = pure_forward(Net(nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(0), (128, 8))
    return run, start, other, x, task_b(x)


def test_jit_vmap_and_grad_through_the_patch_api_on_a_user_model() -> None:
    run, start, other, x, labels = _pair()
    score = lambda alpha: margin(run(apply(alpha, start, other), x), labels)
    alpha = tree_patch(start, "hidden", 0.3)
    # jit: the same number as the eager call, and as patching the dict by hand.
    by_hand = {**start, "hidden": jax.tree_util.tree_map(lambda s, o: s + 0.3 * (o - s),
                                                         start["hidden"], other["hidden"])}
    expected = float(margin(run(by_hand, x), labels))
    assert float(jax.jit(score)(alpha)) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # vmap over three strengths of one patch: each equals its own call.
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *(tree_patch(start, "out", s)
                                                                 for s in (0.0, 0.5, 1.0)))
    many = np.asarray(jax.jit(jax.vmap(score))(stacked))
    singles = [float(score(tree_patch(start, "out", s))) for s in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(many, singles, rtol=1e-5, atol=1e-6)
    # grad with respect to the coefficient of `first`: matches a central finite difference.
    grads = jax.grad(score)(alpha)
    eps = 1e-2

    def at(strength: float) -> float:
        moved = jax.tree_util.tree_map(lambda a, s: a + s, alpha, tree_patch(start, "first.kernel", strength))
        return float(score(moved))
    numeric = (at(eps) - at(-eps)) / (2 * eps)
    assert float(grads["first"]["kernel"]) == pytest.approx(numeric, rel=2e-2, abs=1e-3)


def test_the_tracking_example_locates_the_new_behavior_in_the_trained_layers() -> None:
    tracking = train_and_track(steps=100, every=50)
    assert tracking.steps == [50, 100] and tracking.recovery.shape == (2, len(LAYERS))
    first, hidden, out = tracking.recovery.T
    assert (first == 0).all()  # frozen during fine-tuning: its patch changes nothing
    assert (hidden > 0.1).all() and (out > 0.1).all()
    assert tracking.accuracy_b > tracking.accuracy_b_before + 0.2
