"""Where a seed puts the planted set, the decoys and the experts of a planted pair.

`draw_sets(seed, task, layers, heads, d_ff)` draws, from `numpy.random.default_rng([seed, 8])`:

- **the planted set S**: one query head (with its key/value head) in each of two consecutive
  layers a and a+1 (a uniform over 0..layers-2, each head uniform; a single head in one layer
  does not learn the instruction tasks in this model, two composing heads do), and an MLP part in
  a layer b (uniform over a+1..last): with probability 3/4 a range of d_ff/2 consecutive neurons
  starting at a multiple of d_ff/8 (uniform), otherwise the whole MLP module;
- **the trained decoy set D**, which learns the next instruction task after the measured one
  (map -> reverse -> sort -> map; not the `text` decoy, a shift of every word's statistics,
  which moves the measured answers' probabilities too): the whole attention module of a layer
  c outside {a, a+1} and a range of d_ff/2 neurons of a layer d != b (c, d and the range
  uniform), so D is disjoint from S and spans modules, heads and neurons;
- **the rescaled components** (function-preserving decoys, see `experiments.decoys`): the other
  key/value heads of layers a and a+1 (values against outputs) and, when S's MLP part is a
  neuron range, the other neurons of layer b: S's neighbours, the comparison within a layer;
- **the experts** (for merging), one per other instruction task: the first on the whole attention
  of layers a and a+1 and the last layer's MLP (it overlaps S), the second on D's attention
  module and layer d's whole MLP (disjoint from S).

With an explicit planted set (`collides`, the test of sharing a parameter with it), the
defaults are drawn around it: the decoy's layers and neuron range are drawn again from the same
stream until the decoy shares no parameter with the plant, and a rescaled set that would share
one is left out. Without one the draws are as above, unchanged.

Each set is written as a selector, so a drawn pair is rebuilt from its recorded settings alone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from experiments.language import TASKS

__all__ = ["Sets", "draw_sets"]


@dataclasses.dataclass(frozen=True)
class Sets:
    """A seed's draw (see the module docstring).

    Attributes:
        plant: S.
        decoys: trained decoys as `TASK=SELECTOR`.
        rescale: selectors of neurons and key/value heads to rescale.
        experts: experts as `TASK=SELECTOR`.
    """

    plant: str
    decoys: tuple[str, ...]
    rescale: tuple[str, ...]
    experts: tuple[str, ...]


def draw_sets(seed: int, task: str, layers: int, heads: int, d_ff: int,
              collides: Callable[[str], bool] | None = None) -> Sets:
    """The planted set, decoys, rescaled components and experts a seed gives.

    Arguments:
        seed: the pair's seed.
        task: the measured instruction task (`experiments.language.TASKS`).
        layers, heads, d_ff: the architecture (key/value heads = query heads).
        collides: with an explicit planted set, whether a selector shares a parameter with it:
            the decoy and rescaled sets are then drawn around it (see the module docstring).

    Returns:
        The `Sets`.

    Raises:
        ValueError: an unknown task, fewer than 3 layers, `d_ff` not a multiple of 8, or no
            decoy that fits around the explicit plant.

    Example:
        >>> sets = draw_sets(0, "map", 4, 4, 128)
        >>> sets.plant.count("[head="), sets.decoys[0].split("=")[0], [e[:4] for e in sets.experts]
        (2, 'reverse', ['reve', 'sort'])
        >>> draw_sets(0, "map", 4, 4, 128) == sets != draw_sets(1, "map", 4, 4, 128)
        True
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if layers < 3 or d_ff % 8:
        raise ValueError(f"drawing sets needs at least 3 layers and d_ff a multiple of 8 "
                         f"(got {layers} layers, d_ff {d_ff}): give the sets instead (--plant; --decoy or "
                         "--no-decoys; --rescale or --no-rescale; --expert or --no-experts)")
    rng = np.random.default_rng([seed, 8])
    half, step = d_ff // 2, d_ff // 8
    a = int(rng.integers(layers - 1))
    chosen = [int(h) for h in rng.integers(heads, size=2)]
    b = int(rng.integers(a + 1, layers))
    start = int(rng.integers(5)) * step
    neurons = rng.random() < 0.75
    decoy_layers = [i for i in range(layers) if i not in (a, a + 1)]
    mlp_layers = [i for i in range(layers) if i != b]

    def decoy_of(c: int, d: int, d_start: int) -> str:
        return f"layers.{c}.self_attn | layers.{d}.mlp[neuron={d_start}-{d_start + half - 1}]"

    c, d, d_start = (int(rng.choice(decoy_layers)), int(rng.choice(mlp_layers)),
                     int(rng.integers(5)) * step)
    for _ in range(200):  # around an explicit plant: draw again from the same stream
        if collides is None or not collides(decoy_of(c, d, d_start)):
            break
        c, d, d_start = (int(rng.choice(decoy_layers)), int(rng.choice(mlp_layers)),
                         int(rng.integers(5)) * step)
    else:
        raise ValueError("every decoy of the drawn shape (an attention module and half of an MLP) "
                         "shares a parameter with the planted set: give --decoy or --no-decoys")

    attention = " | ".join(f"layers.{a + i}.self_attn[{key}={h}]"
                           for i, h in enumerate(chosen) for key in ("head", "kv_head"))
    mlp = f"layers.{b}.mlp[neuron={start}-{start + half - 1}]" if neurons else f"layers.{b}.mlp"
    rescale = [f"layers.{a + i}.self_attn[kv_head={_ranges([g for g in range(heads) if g != h])}]"
               for i, h in enumerate(chosen)]
    if neurons:
        outside = [n for n in range(d_ff) if not start <= n < start + half]
        rescale.append(f"layers.{b}.mlp[neuron={_ranges(outside)}]")
    decoy = decoy_of(c, d, d_start)
    if collides is not None:
        rescale = [r for r in rescale if not collides(r)]
    first, second = (TASKS[(TASKS.index(task) + i) % len(TASKS)] for i in (1, 2))
    experts = (f"{first}=layers.{a}.self_attn | layers.{a + 1}.self_attn | layers.{layers - 1}.mlp",
               f"{second}=layers.{c}.self_attn | layers.{d}.mlp")
    return Sets(f"{attention} | {mlp}", (f"{first}={decoy}",), tuple(rescale), experts)


def _ranges(indices: list[int]) -> str:
    """`[0, 1, 2, 5]` -> `"0-2,5"` (a selector's index list).

    Example:
        >>> _ranges([0, 1, 2, 5, 7, 8])
        '0-2,5,7-8'
    """
    parts: list[str] = []
    run = [indices[0]]
    for i in indices[1:] + [None]:
        if i is not None and i == run[-1] + 1:
            run.append(i)
            continue
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        if i is not None:
            run = [i]
    return ",".join(parts)
