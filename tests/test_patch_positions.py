"""Weight patches restricted to token positions (`prepare(..., patch_at=...)`): the decoder's
per-position mixing against what it must equal (the unrestricted patch where every position is
chosen, the start model where none is, each endpoint's own output where a module acts per
position), the engine's sweeps and generation against plain forwards, and the roles and marks
that say where a patch applies."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from tokenizers import Tokenizer, models, pre_tokenizers

import jaxpatch
from jaxpatch import Patch, prepare
from jaxpatch._tree import flatten_params, replace_leaves
from jaxpatch.chat import ChatTemplate
from jaxpatch.engine.generation import generate_under_patches
from jaxpatch.errors import InvalidInputError, PromptsError
from jaxpatch.examples import example_pair, random_pair
from jaxpatch.models.decoder import MixedWeight, forward
from jaxpatch.prompts import (
    Prompt,
    make_batch,
    marked_positions,
    patch_where,
    read_prompts,
    token_roles,
)

PROMPTS = [Prompt((5, 9, 2, 7, 1, 3), target=(4, 6)), Prompt((4, 8), target=(2,)),
           Prompt((11, 12, 13, 14), target=(9, 9, 9))]
# what a restricted patch must reach: biases, layer norms and learned positions (gpt2), per-head
# q/k norms (qwen3), a q/k norm over the whole projection and output norms (olmo2), sandwich
# norms, a scaled embedding and sliding windows (gemma3_text)
FAMILIES = ["gpt2", "qwen3", "olmo2", "gemma3_text"]
EVERYTHING = "embed_tokens | layers | norm | lm_head"


def mixed(base, donor, patch: Patch, where) -> dict:
    """The base's params with the patch's leaves as (position-restricted) `MixedWeight`s."""
    alpha = flatten_params(patch.alpha)
    start, target = flatten_params(base.params), flatten_params(donor.params)
    leaves = {n: MixedWeight(start[n], target[n], jnp.asarray(a), where)
              for n, a in alpha.items() if np.any(np.asarray(a) != 0)}
    return replace_leaves(base.params, leaves)


def patches(config) -> dict[str, Patch]:
    """A whole-model patch, heads and neurons (alpha along output and input axes)."""
    return {"everything": Patch.from_selector(config, EVERYTHING),
            "heads": Patch.from_selector(config, "layers.0-1.self_attn[head=1]", "head"),
            "neurons": Patch.from_selector(config, "layers.0-1.mlp[neuron=0-7]", "neuron")}


def logits(config, params, batch, **kwargs) -> np.ndarray:
    return np.asarray(forward(config, params, batch.tokens, batch.mask, **kwargs).read(None))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_position_chosen_is_the_unrestricted_patch_and_none_is_the_base(family) -> None:
    base, donor = random_pair(family, scale=0.5)
    config = base.config
    batch = make_batch(config, PROMPTS, "targets")
    ones, zeros = jnp.ones(batch.tokens.shape), jnp.zeros(batch.tokens.shape)
    plain = logits(config, base.params, batch)
    for name, patch in patches(config).items():
        unrestricted = logits(config, mixed(base, donor, patch, None), batch)
        assert np.abs(unrestricted - plain).max() > 1e-3, name  # the patch does something
        np.testing.assert_allclose(logits(config, mixed(base, donor, patch, ones), batch),
                                   unrestricted, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(logits(config, mixed(base, donor, patch, zeros), batch),
                                   plain, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2"])
def test_a_module_acting_per_position_takes_each_endpoints_output_where_chosen(family) -> None:
    """The last block's MLP, o_proj and q_proj (and norms after attention) act on each position
    alone: patched at chosen positions, the block's output there is the fully patched one's, and
    the base's elsewhere."""
    base, donor = random_pair(family, scale=0.5)
    config = base.config
    last = config.n_layers - 1
    selector = f"layers.{last}.mlp | layers.{last}.self_attn.o_proj | layers.{last}.self_attn.q_proj"
    patch = Patch.from_selector(config, selector)
    batch = make_batch(config, PROMPTS, "last")
    where = jnp.asarray(np.random.default_rng(0).integers(0, 2, batch.tokens.shape), jnp.float32)

    def residual(params) -> np.ndarray:
        return np.asarray(forward(config, params, batch.tokens, batch.mask, stop_layer=last).residual)

    restricted = residual(mixed(base, donor, patch, where))
    full, plain = residual(mixed(base, donor, patch, None)), residual(base.params)
    expected = np.where(np.asarray(where)[..., None] == 1, full, plain)
    np.testing.assert_allclose(restricted, expected, atol=2e-5)


@settings(max_examples=8, deadline=None)
@given(family=st.sampled_from(FAMILIES), start=st.integers(1, 5),
       selector=st.sampled_from([EVERYTHING, "layers.0.self_attn.k_proj", "embed_tokens",
                                 "layers.1.self_attn.v_proj | layers.0.mlp"]))
def test_a_patch_from_position_t_on_leaves_every_earlier_position_alone(family, start,
                                                                         selector) -> None:
    base, donor = random_pair(family, scale=0.5)
    config = base.config
    batch = make_batch(config, PROMPTS, "last")
    where = (jnp.arange(batch.tokens.shape[1])[None] >= start).astype(jnp.float32)
    where = jnp.broadcast_to(where, batch.tokens.shape)
    patched = logits(config, mixed(base, donor, Patch.from_selector(config, selector), where), batch)
    plain = logits(config, base.params, batch)
    np.testing.assert_allclose(patched[:, :start], plain[:, :start], atol=2e-5)
    assert np.abs(patched[0, start:] - plain[0, start:]).max() > 1e-4  # prompt 0 reaches there


@pytest.mark.parametrize("family", ["llama", "olmo2", "gpt2"])
def test_reading_some_positions_gathers_the_restriction_with_them(family) -> None:
    base, donor = random_pair(family, scale=0.5)
    config = base.config
    batch = make_batch(config, PROMPTS, "targets")
    where = jnp.asarray(np.random.default_rng(1).integers(0, 2, batch.tokens.shape), jnp.float32)
    params = mixed(base, donor, Patch.from_selector(config, EVERYTHING), where)
    whole = logits(config, params, batch)
    some = logits(config, params, batch, readout_positions=batch.positions)
    np.testing.assert_allclose(some, np.take_along_axis(whole, np.asarray(batch.positions)[..., None],
                                                        axis=1), atol=2e-5)


def _log_prob(config, params, batch) -> float:
    """The log-probability metric computed by hand: mean over prompts of the summed
    log-probabilities of the targets at the positions predicting them."""
    logp = jax.nn.log_softmax(forward(config, params, batch.tokens, batch.mask).logits, -1)
    at = jnp.take_along_axis(logp, batch.positions[..., None], axis=1)
    picked = jnp.take_along_axis(at, jnp.maximum(batch.targets, 0)[..., None], axis=2)[..., 0]
    return float(jnp.mean(jnp.sum(jnp.where(batch.weights > 0, picked, 0.0), axis=1)))


@pytest.mark.parametrize("patch_at", ["prompt", "response", "first-response"])
def test_a_restricted_sweep_scores_what_a_plain_forward_of_the_restricted_patch_scores(patch_at):
    example = example_pair()
    base, donor, config = example.base, example.donor, example.config
    prompts = [Prompt(p.tokens, target=p.target) for p in PROMPTS]
    batch = make_batch(config, prompts, "targets")
    pair = prepare(base, donor, batch, positions="targets", patch_at=patch_at)
    names = ["embed_tokens", "layers.0.self_attn.k_proj", "layers.1.mlp.down_proj",
             "layers.0.self_attn.o_proj", "norm"]
    items = [c for c in jaxpatch.select(config, None, "module") if c.name in names]
    result = jaxpatch.sweep(pair, jaxpatch.LogProb(), candidates=items)
    assert result.patch_at == patch_at
    where = patch_where(batch.roles, patch_at)
    for name, score in zip(result.names, result.scores):
        params = mixed(base, donor, Patch.from_selector(config, name), where)
        assert score == pytest.approx(_log_prob(config, params, batch), abs=1e-5), name
    assert result.scores.tolist() != jaxpatch.sweep(prepare(base, donor, batch, positions="targets"),
                                                    jaxpatch.LogProb(), candidates=items).scores.tolist()


def test_marking_every_token_sweeps_as_patching_everywhere() -> None:
    example = example_pair()
    base, donor, config = example.base, example.donor, example.config
    everything = [Prompt(p.tokens, marked=tuple(range(len(p.tokens)))) for p in PROMPTS]
    batch = make_batch(config, everything, "last")
    metric = jaxpatch.VectorAnchor(layer=1)
    marked = jaxpatch.sweep(prepare(base, donor, batch, patch_at="marked"), metric)
    plain = jaxpatch.sweep(prepare(base, donor, batch), metric)
    np.testing.assert_allclose(marked.scores, plain.scores, atol=1e-5)


def _greedy_restricted(config, base, donor, patch, prompt: Prompt, n: int, patch_at) -> list[int]:
    """Greedy decoding by rerunning the whole sequence each step, the patch restricted anew
    over the sequence so far (no cache)."""
    sequence = list(prompt.tokens)
    for _ in range(n):
        roles = token_roles([Prompt(prompt.tokens, marked=prompt.marked)], len(sequence))
        params = mixed(base, donor, patch, patch_where(roles, patch_at))
        out = forward(config, params, jnp.asarray([sequence])).logits
        sequence.append(int(jnp.argmax(out[0, -1])))
    return sequence[len(prompt.tokens):]


@pytest.mark.slow
@pytest.mark.parametrize("patch_at", ["prompt", "response", "marked"])
def test_restricted_generation_picks_what_a_full_forward_of_the_restricted_patch_picks(patch_at):
    base, donor = random_pair("gemma3_text", scale=0.6, n_layers=2)
    config = base.config
    prompts = [Prompt((5, 9, 2, 7, 1, 3), marked=(1, 2)), Prompt((4, 8), marked=(0,))]
    selectors = {"attention 0": "layers.0.self_attn", "everything": EVERYTHING}
    pair = prepare(base, donor, make_batch(config, prompts, "last"), patch_at=patch_at)
    out = generate_under_patches(pair, {k: Patch.from_selector(config, s)
                                        for k, s in selectors.items()}, prompts, 5)
    for name, selector in selectors.items():
        patch = Patch.from_selector(config, selector)
        for row, prompt in enumerate(prompts):
            assert out[name][row].tolist() == _greedy_restricted(config, base, donor, patch, prompt,
                                                                 5, patch_at), (name, row)


def test_methods_that_patch_everywhere_refuse_a_restricted_pair() -> None:
    example = example_pair()
    pair = prepare(example.base, example.donor, example.batch, patch_at="response")
    metric = jaxpatch.VectorAnchor(layer=1)
    for run in (lambda: jaxpatch.attribute(pair, metric),
                lambda: jaxpatch.activation_patching(pair, metric),
                lambda: jaxpatch.learn_patch(pair, metric)):
        with pytest.raises(InvalidInputError, match="restricts patches to the 'response' positions"):
            run()
    with pytest.raises(InvalidInputError, match="patch positions"):
        prepare(example.base, example.donor, example.batch, patch_at="instruction")  # type: ignore[arg-type]
    assert "patches at response" in repr(pair)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), extra=st.integers(0, 3),
       data=st.data())
def test_prompt_and_response_split_every_real_position(lengths, extra, data) -> None:
    prompts = [Prompt(tuple(range(1, n + 1)),
                      marked=tuple(sorted(data.draw(st.sets(st.integers(0, n - 1))))))
               for n in lengths]
    width = max(lengths) + extra
    roles = token_roles(prompts, width)
    prompt, response = (np.asarray(patch_where(roles, at)) for at in ("prompt", "response"))
    first, marked = (np.asarray(patch_where(roles, at)) for at in ("first-response", "marked"))
    assert np.all(prompt + response == 1)  # a partition of the buffer
    for i, p in enumerate(prompts):
        n = len(p.tokens)
        assert prompt[i].tolist() == [1.0] * (n - 1) + [0.0] * (width - n + 1)
        assert np.flatnonzero(first[i]).tolist() == [n - 1]
        assert np.flatnonzero(marked[i]).tolist() == list(p.marked)
    assert patch_where(roles, "everywhere") is None


def test_a_mark_outside_its_prompt_is_refused() -> None:
    with pytest.raises(PromptsError, match="prompt 1 marks a position outside its 2 tokens"):
        token_roles([Prompt((1, 2), marked=(2,))], 4)


def _tokenizer() -> Tokenizer:
    words = ["<user>", "<model>", "Name", "a", "colour", ".", "Answer", "in", "capitals"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "Name"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_a_prompt_line_marks_the_tokens_of_its_mark(tmp_path) -> None:
    tok = _tokenizer()
    template = ChatTemplate("{% for m in messages %}<user> {{ m.content }} {% endfor %}"
                            "{% if add_generation_prompt %}<model>{% endif %}")
    lines = [{"instruction": "Name a colour . Answer in capitals", "mark": "Answer in capitals"},
             {"text": "Name a colour", "mark": "colour"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    chat, plain = read_prompts(path, tok, template)
    assert [tok.id_to_token(chat.tokens[i]) for i in chat.marked] == ["Answer", "in", "capitals"]
    assert [tok.id_to_token(plain.tokens[i]) for i in plain.marked] == ["colour"]
    assert marked_positions(tok, "a colour a colour", "colour") == (3,)  # the last occurrence
    path.write_text(json.dumps({"text": "Name a colour", "mark": "green"}) + "\n")
    with pytest.raises(PromptsError, match=r"p.jsonl:1: the mark 'green' does not occur"):
        read_prompts(path, tok)
    path.write_text(json.dumps({"tokens": [1, 2], "mark": "a"}) + "\n")
    with pytest.raises(PromptsError, match=r"p.jsonl:1: 'mark' needs a 'text'"):
        read_prompts(path, tok)


def test_the_command_line_sweeps_and_judges_with_patches_at_some_positions(tmp_path, capsys) -> None:
    from jaxpatch.cli import main
    from jaxpatch.studies.evaluate import default_pair_dir

    folder = default_pair_dir()
    run = ["--base", str(folder / "base"), "--donor", str(folder / "donor"),
           "--prompts", str(folder / "prompts" / "map.jsonl"), "--no-progress",
           "--select", "layers.1"]
    scores = {}
    for at in ("everywhere", "response"):
        out = tmp_path / at
        assert main(["sweep", *run, "--patch-at", at, "--out", str(out)]) == 0
        record = json.loads((out / "scores.json").read_text())
        assert record["patch_at"] == at
        scores[at] = [c["score"] for c in record["components"]]
    assert scores["everywhere"] != scores["response"]
    assert main(["faithfulness", *run, "--patch-at", "prompt", "--random", "0",
                 "--direction", "denoise", "--out", str(tmp_path / "f")]) == 0
    assert "patches applied at the prompt positions only" in capsys.readouterr().out
    assert main(["attribute", *run, "--out", str(tmp_path / "a")]) == 0  # no --patch-at there
    with pytest.raises(SystemExit):
        main(["attribute", *run, "--patch-at", "response"])
