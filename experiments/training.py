"""Training the models of a pair: the one masked-Adam loop every builder uses, and the objective a
trained decoy learns.

`train` updates only the parameters its mask allows (the others stay bit-identical), optionally
until a check says stop; the synthetic planted pairs (`experiments.planted`) and the real one on
gemma-3-270m (`experiments.planted_real`) both train with it. `retaining` is the decoy objective:
learn something else while keeping the measured task's next-token distributions where a frozen
teacher has them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.language import Language
from jaxpatch._tree import flatten_params, replace_leaves
from jaxpatch.models.config import ModelConfig, Params
from jaxpatch.models.decoder import forward
from jaxpatch.studies.scoring import plant_mask, plant_patch

__all__ = ["model_config", "next_token_loss", "Trained", "Objective", "trainable_mask", "train",
           "text_kl", "answer_kl", "retaining"]


def model_config(language: Language, layers: int, d_model: int, heads: int, d_ff: int) -> ModelConfig:
    """A Llama-style config sized for the language.

    Example:
        >>> model_config(Language.generate(0), 4, 64, 4, 128).vocab_size
        40
    """
    return ModelConfig(family="llama", vocab_size=len(language.vocabulary), d_model=d_model,
                       n_layers=layers, n_heads=heads, n_kv_heads=heads, head_dim=d_model // heads,
                       d_ff=d_ff, max_position_embeddings=64, norm_eps=1e-5)


def next_token_loss(config: ModelConfig, params: Params, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting `ids[:, 1:]`, weighted per position.

    Arguments:
        config: the architecture.
        params: the model.
        ids: `[batch, seq]` token ids.
        weights: `[batch, seq - 1]` how much each predicted position counts.

    Returns:
        The weighted mean cross-entropy, a scalar.

    Example:
        >>> cfg = jaxpatch.ModelConfig.tiny("llama")
        >>> p = jaxpatch.init_params(cfg, jax.random.key(0))
        >>> ids = jnp.array([[1, 2, 3, 4]])
        >>> round(float(next_token_loss(cfg, p, ids, jnp.ones((1, 3)))), 2) > 0
        True
    """
    logits = forward(config, params, ids[:, :-1]).read(None)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked * weights) / jnp.sum(weights)


class Trained(NamedTuple):
    """What `train` returns."""

    params: Params
    losses: list[float]  # every `log_every` steps and at the last step
    steps: int  # steps run (fewer than asked when `stop` said so)


Objective = Callable[[Params, Any], jax.Array]


def trainable_mask(config: ModelConfig, selector: str) -> Params:
    """The 0/1 mask of the parameters a selector's components own (`plant_mask`): what a
    masked `train` may change.

    Example:
        >>> cfg = jaxpatch.ModelConfig.tiny("llama")
        >>> m = trainable_mask(cfg, "layers.1.mlp[neuron=0-3]")
        >>> down = m["layers"][1]["mlp"]["down_proj"]["weight"]  # [d_ff, d_model]: 4 rows of 32
        >>> int((down.sum(1) > 0).sum()), float(down.sum()), float(m["norm"]["weight"].sum())
        (4, 128.0, 0.0)
    """
    return plant_mask(config, plant_patch(config, selector))


def train(params: Params, loss_of: Objective, batches: Iterator[Any], steps: int,
          learning_rate: float, *, mask: Params | None = None, clip: float | None = 1.0,
          label: str = "train", stop: Callable[[Params], bool] | None = None,
          check_every: int = 250, log_every: int = 50) -> Trained:
    """Adam with warmup and cosine decay over `steps`, on the parameters `mask` allows only: the
    one training loop of every pair builder (planted, real planted, instruction-tuned, experts).

    Only the leaves the mask touches are differentiated and given optimizer state (on a real
    model most of the cost is elsewhere, and a frozen leaf needs no Adam moments); inside a
    leaf, entries the mask zeroes get no update, so everything outside the mask stays
    bit-identical.

    Arguments:
        params: where training starts.
        loss_of: `loss_of(params, batch) -> loss`. The arrays of each batch are arguments of the
            compiled step, never constants folded into it.
        batches: batches to train on, one per step (`itertools.repeat(data)` for a fixed set).
        steps: the most steps to run (the schedule's length).
        learning_rate: the peak learning rate.
        mask: 0/1 per parameter (`trainable_mask`); None trains everything.
        clip: clip gradients to this global norm first (None: no clipping).
        label: the progress bar's name.
        stop: asked every `check_every` steps (and after the last); training ends when it says
            True.
        check_every, log_every: how often `stop` is asked and the loss recorded.

    Returns:
        A `Trained`.

    Example:
        >>> import itertools
        >>> cfg = jaxpatch.ModelConfig.tiny("llama")
        >>> p = jaxpatch.init_params(cfg, jax.random.key(0))
        >>> ids, w = jnp.array([[1, 2, 3, 4]]), jnp.ones((1, 3))
        >>> loss = lambda params, batch: next_token_loss(cfg, params, *batch)
        >>> out = train(p, loss, itertools.repeat((ids, w)), 5, 1e-2,
        ...             mask=trainable_mask(cfg, "layers.1.mlp"), label="x")
        >>> out.steps, bool(jnp.all(out.params["layers"][0]["mlp"]["up_proj"]["weight"]
        ...                         == p["layers"][0]["mlp"]["up_proj"]["weight"]))
        (5, True)
    """
    flat = flatten_params(params)
    if mask is None:
        masks = {name: None for name in flat}
    else:
        flat_mask = flatten_params(mask)
        masks = {name: jnp.asarray(m) for name, m in flat_mask.items() if np.any(np.asarray(m))}
    trainable = {name: flat[name] for name in masks}
    frozen = {name: leaf for name, leaf in flat.items() if name not in masks}

    def merged(leaves: dict[str, jax.Array], fixed: dict[str, jax.Array]) -> Params:
        """Every leaf given: the frozen ones are arguments of the compiled step, never constants
        folded into it (a real model's embeddings are hundreds of megabytes)."""
        return replace_leaves(params, {**fixed, **leaves})

    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps,
                                                  learning_rate * 0.05)
    optimizer = optax.chain(*([optax.clip_by_global_norm(clip)] if clip is not None else []),
                            optax.adam(schedule))
    state = optimizer.init(trainable)

    @jax.jit
    def step(leaves: dict[str, jax.Array], fixed: dict[str, jax.Array], state: Any,
             batch: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda x: loss_of(merged(x, fixed), batch))(leaves)
        grads = {k: g if masks[k] is None else g * masks[k] for k, g in grads.items()}
        changes, state = optimizer.update(grads, state, leaves)
        # clip and Adam keep zeros at zero; this makes it explicit
        updates = {k: _inside(u, masks[k]) for k, u in cast(dict[str, jax.Array], changes).items()}
        return optax.apply_updates(leaves, updates), state, loss

    from tqdm.auto import tqdm

    losses: list[float] = []
    done = 0
    for i in tqdm(range(steps), desc=label, dynamic_ncols=True, mininterval=2.0):
        trainable, state, loss = step(trainable, frozen, state,
                                      jax.tree_util.tree_map(jnp.asarray, next(batches)))
        done = i + 1
        if i % log_every == 0 or done == steps:
            losses.append(round(float(loss), 5))
        if stop is not None and (done % check_every == 0 or done == steps) and stop(
                merged(trainable, frozen)):
            if i % log_every and done != steps:
                losses.append(round(float(loss), 5))
            break
    return Trained(merged(trainable, frozen), losses, done)


def text_kl(teacher_logp: jax.Array, logp: jax.Array, mask: Any) -> jax.Array:
    """Mean KL(teacher || model) over the real positions of a text batch, from next-token
    log-probabilities `[n, seq, vocab]` (what keeps a donor's language modeling where the base
    had it while it learns).

    Example:
        >>> logp = jax.nn.log_softmax(jnp.array([[[1.0, 2.0]]]), -1)
        >>> float(text_kl(logp, logp, jnp.ones((1, 1))))
        0.0
    """
    kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), -1)
    weights = jnp.asarray(mask, jnp.float32)
    return jnp.sum(kl * weights) / jnp.sum(weights)


def _inside(update: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`update` where `mask` is positive, 0 elsewhere (all of it without a mask)."""
    return update if mask is None else jnp.where(mask > 0, update, 0)


def answer_kl(config: ModelConfig, fixed: Params, params: Params, ids: jax.Array,
              weights: jax.Array) -> jax.Array:
    """The weighted mean KL divergence from `fixed`'s next-token distributions (held constant) to
    `params`' on `ids[:, :-1]`.

    Example:
        >>> cfg = jaxpatch.ModelConfig.tiny("llama")
        >>> p, q = (jaxpatch.init_params(cfg, jax.random.key(i)) for i in (0, 1))
        >>> ids, w = jnp.array([[1, 2, 3, 4]]), jnp.ones((1, 3))
        >>> float(answer_kl(cfg, p, p, ids, w)), bool(answer_kl(cfg, p, q, ids, w) > 0)
        (0.0, True)
    """
    student = jax.nn.log_softmax(forward(config, params, ids[:, :-1]).read(None), axis=-1)
    teacher = jax.nn.log_softmax(forward(config, fixed, ids[:, :-1]).read(None), axis=-1)
    teacher = jax.lax.stop_gradient(teacher)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return jnp.sum(kl * weights) / jnp.sum(weights)


def retaining(config: ModelConfig, teacher: Params, retain: float, base: Params | None = None,
              mask: Params | None = None, retain_base: float = 0.0) -> Objective:
    """The decoy objective: next-token loss on a decoy batch, plus `retain` times the KL
    divergence from the teacher's to the model's next-token distributions on the measured task's
    answer positions, plus (optionally) `retain_base` times the same divergence between the base
    and the base with the decoy set patched in. Batches are
    `(decoy_ids, decoy_weights, task_ids, task_weights)`.

    Arguments:
        config: the architecture.
        teacher: the donor before the decoy (held fixed).
        retain: the weight of the donor-side KL term (0: learn the decoy with no regard for the
            task).
        base, mask: the base model and the decoy set's 0/1 mask, for the base-side term.
        retain_base: the weight of the base-side term (0: none).

    Returns:
        An objective for `train`.

    Example:
        >>> cfg = jaxpatch.ModelConfig.tiny("llama")
        >>> p = jaxpatch.init_params(cfg, jax.random.key(0))
        >>> ids, w = jnp.array([[1, 2, 3, 4]]), jnp.ones((1, 3))
        >>> loss = retaining(cfg, p, 1.0)(p, (ids, w, ids, w))  # the KL term is 0 at the teacher
        >>> bool(jnp.isclose(loss, next_token_loss(cfg, p, ids, w)))
        True
    """
    if retain_base and (base is None or mask is None):
        raise ValueError("the base-side retention term needs the base and the decoy set's mask")
    base_side = (base, mask) if retain_base and base is not None and mask is not None else None

    def objective(params: Params, batch: Any) -> jax.Array:
        ids, weights, task_ids, task_weights = batch
        loss = next_token_loss(config, params, ids, weights)
        loss = loss + retain * answer_kl(config, teacher, params, task_ids, task_weights)
        if base_side is not None:
            fixed, inside = base_side
            patched = jax.tree_util.tree_map(lambda m, p, b: jnp.where(m > 0, p, b), inside, params, fixed)
            loss = loss + retain_base * answer_kl(config, fixed, patched, task_ids, task_weights)
        return loss

    return objective
