"""The planted-capability experiment: the language, masked training, the shipped pair."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from experiments.language import Language, task_batches
from experiments.planted import Settings, build, check_donor, main, write
from experiments.training import model_config, next_token_loss, train
from jaxpatch import Execution, JaxpatchError, flatten_params, forward, init_params, plant_patch, prepare
from jaxpatch.studies.evaluate import behavior, default_pair_dir, load_planted, task_accuracy
from jaxpatch.studies.scoring import plant_mask


def test_language_is_deterministic_and_follows_its_chain() -> None:
    a, b = Language.generate(3), Language.generate(3)
    text = a.text(np.random.default_rng(0), 8, 20)
    np.testing.assert_array_equal(text, b.text(np.random.default_rng(0), 8, 20))
    assert not np.array_equal(a.successors, Language.generate(4).successors)
    words = text[:, 1:] - int(a.word(0))
    for row in words:
        for prev, nxt in zip(row[:-1], row[1:]):
            assert nxt in a.successors[prev]


@pytest.mark.parametrize("task", ["map", "reverse", "sort"])
def test_instruction_answers(task) -> None:
    lang = Language.generate(0)
    ids, split = lang.instructions(np.random.default_rng(1), task, 16)
    words = ids[:, 2:split - 1] - int(lang.word(0))
    answer = ids[:, split:-1] - int(lang.word(0))
    expected = {"map": lang.mapping[words], "reverse": words[:, ::-1],
                "sort": np.sort(words, axis=1)}[task]
    np.testing.assert_array_equal(answer, expected)
    assert (ids[:, 1] == lang.token(f"<{task}>")).all() and (ids[:, -1] == lang.token("<eos>")).all()
    assert all(len(set(row)) == lang.length for row in words)


def test_masked_training_moves_only_the_planted_set() -> None:
    lang = Language.generate(0)
    config = model_config(lang, 2, 16, 2, 32)
    params = init_params(config, jax.random.key(0))
    plant = plant_patch(config, "layers.1.self_attn[head=0] | layers.0.mlp[neuron=0-3]")
    mask = plant_mask(config, plant)
    loss = lambda p, batch: next_token_loss(config, p, *batch)
    trained, losses, steps = train(params, loss, task_batches(lang, np.random.default_rng(0), "map", 8),
                                   3, 1e-2, mask=mask)
    ids, weights = next(task_batches(lang, np.random.default_rng(0), "map", 8))  # the first batch
    before, after, m = (flatten_params(t) for t in (params, trained, mask))
    for name in before:
        inside = np.asarray(m[name]) > 0
        moved = np.asarray(after[name]) != np.asarray(before[name])
        assert not moved[~inside].any(), name
        if inside.any():
            assert moved[inside].any(), name
    # Losses are recorded at step 0 and at the last step; the first is the untrained model's
    # cross-entropy on the first batch, computed here in float64 from the logits.
    logits = np.asarray(forward(config, params, ids[:, :-1]).read(None), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    assert len(losses) == 2 and steps == 3
    assert losses[0] == pytest.approx(-(picked * weights).sum() / weights.sum(), abs=2e-5)


def test_training_stops_when_asked_and_only_then() -> None:
    lang = Language.generate(0)
    config = model_config(lang, 2, 16, 2, 32)
    params = init_params(config, jax.random.key(0))
    batches = task_batches(lang, np.random.default_rng(0), "map", 4)
    asked: list[int] = []

    def stop(p) -> bool:
        asked.append(len(asked))
        return len(asked) == 2
    loss = lambda p, batch: next_token_loss(config, p, *batch)
    out = train(params, loss, batches, 20, 1e-2, check_every=3, stop=stop)
    assert out.steps == 6 and asked == [0, 1]  # checked after steps 3 and 6, stopped at 6
    assert train(params, loss, batches, 5, 1e-2, check_every=3, stop=lambda p: False).steps == 5


TINY = dict(layers=2, d_model=16, heads=2, d_ff=32, base_steps=4, drift_steps=2, task_steps=3,
            decoy_steps=3, batch=4, patch_prompts=4, eval_prompts=4, check_every=2,
            target_accuracy=0.0, min_decoy_movement=0.0)  # 3 steps teach nothing


@pytest.mark.slow
def test_tiny_build_is_deterministic_and_writes_loadable_pairs(tmp_path) -> None:
    settings = Settings(**TINY, plant="layers.1.mlp", experts=("sort=layers.0.self_attn",),
                        decoys=("text=layers.0.mlp",), rescale=("layers.1.self_attn[kv_head=0]",))
    first, second = build(settings, log=lambda _: None), build(settings, log=lambda _: None)
    for name in first["models"]:
        for a, b in zip(jax.tree_util.tree_leaves(first["models"][name]),
                        jax.tree_util.tree_leaves(second["models"][name])):
            np.testing.assert_array_equal(a, b)
    write(first, tmp_path / "pair")
    pair = load_planted(tmp_path / "pair")
    assert pair.plant == "layers.1.mlp" and len(pair.prompts) == 4
    assert (tmp_path / "pair" / "experts" / "sort" / "model.safetensors").is_file()
    # The written text round-trips through the shipped tokenizer to the written ids.
    assert tuple(pair.base.tokenizer.encode("<bos> <map> w00 w01").ids) == (2, 5, 8, 9)
    record = pair.record["models"]["experts/sort"]
    assert record["plant"] == "layers.0.self_attn" and set(record["accuracy"]) == {
        "base", "drift", "trained", "plant_patched_base"}
    # The decoy moved only its own set after the task was learned; the rescaling moved v and o.
    before, after = (flatten_params(first[k] if k == "donor_without_decoys" else first["models"][k])
                     for k in ("donor_without_decoys", "donor"))
    moved = {n for n in before if not np.array_equal(np.asarray(before[n]), np.asarray(after[n]))}
    assert moved == {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                     "layers.0.mlp.down_proj.weight", "layers.1.self_attn.v_proj.weight",
                     "layers.1.self_attn.o_proj.weight"}
    movement = pair.record["movement"]["module"]
    assert [n for n, d in zip(movement["names"], movement["in_D"]) if d] == [
        "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    assert pair.record["rescaled"]["max_logit_change"] < 1e-4
    # The control pair: the same base, the donor before its decoys.
    from experiments.planted import without_decoys

    plain = without_decoys(first)
    assert plain["models"]["donor"] is first["donor_without_decoys"]
    assert plain["record"]["settings"]["decoys"] == () and not any(
        plain["record"]["movement"]["neuron"]["in_D"])


def test_a_donor_that_did_not_learn_its_task_fails_the_build(tmp_path, capsys) -> None:
    out = tmp_path / "pair"
    tiny = ["--layers", "2", "--d-model", "16", "--heads", "2", "--d-ff", "32", "--base-steps", "2",
            "--drift-steps", "2", "--task-steps", "2", "--batch", "4", "--patch-prompts", "4",
            "--eval-prompts", "8", "--plant", "layers.1.mlp", "--no-experts", "--no-decoys",
            "--no-rescale"]
    assert main([*tiny, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1:]  # after the progress bars
    assert error == ["planted: error: the donor reached 0% map accuracy after 2 task steps, under "
                     "the target of 95%: raise --task-steps, change --task-lr, or plant a larger "
                     "set; nothing was written"]
    assert not out.exists()
    with pytest.raises(JaxpatchError, match="the base already reaches 0% map accuracy, over the maximum of -1%"):
        check_donor({"base": 0.0, "trained": 1.0}, Settings(max_base_accuracy=-0.01), 10)


@pytest.mark.parametrize(("flags", "message"), [
    (["--decoy", "map=layers.0.mlp", "--no-rescale"],
     "decoy 'map=layers.0.mlp' learns the measured task map"),
    (["--decoy", "text=layers.1.mlp[neuron=0]", "--no-rescale"], "shares layers.1.mlp.down_proj.weight"),
    (["--decoy", "chat=layers.0.mlp", "--no-rescale"], "decoy 'chat=layers.0.mlp' must be TASK=SELECTOR"),
    (["--rescale", "layers.1.mlp[neuron=3]", "--no-decoys"],
     "rescaled set 'layers.1.mlp[neuron=3]' shares"),
    (["--no-decoys"], "drawing sets needs at least 3 layers"),
])
def test_decoys_that_would_blur_the_labels_are_refused_before_training(tmp_path, capsys, flags,
                                                                        message) -> None:
    out = tmp_path / "pair"
    tiny = ["--layers", "2", "--d-model", "16", "--heads", "2", "--d-ff", "32", "--plant",
            "layers.1.mlp[neuron=0-7]", "--no-experts", "--out", str(out)]
    assert main([*tiny, *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("planted: error: ") and message in error and "\n" not in error
    assert not out.exists()


@pytest.mark.parametrize("plant", [
    "layers.0.self_attn | layers.2.self_attn[head=1] | layers.3.mlp[neuron=0-63]",
    "layers.0-3.mlp[neuron=0-31] | layers.1.self_attn",
])
def test_defaults_are_drawn_around_an_explicit_plant(plant: str) -> None:
    """The decoy and rescaled sets a seed would draw are drawn around an explicit plant, so a
    user who names S is never refused for a decoy they did not ask for."""
    from experiments.planted import _shared, check_sets, resolve
    from experiments.training import trainable_mask

    for seed in range(8):
        settings = resolve(Settings(plant=plant, seed=seed, task="reverse", experts=()))
        config = model_config(Language.generate(seed), settings.layers, settings.d_model,
                              settings.heads, settings.d_ff)
        check_sets(config, settings)  # refuses any overlap
        inside = trainable_mask(config, plant)
        drawn = [spec.partition("=")[2] for spec in settings.decoys or ()] + list(settings.rescale or ())
        assert settings.decoys and all(_shared(config, inside, s) is None for s in drawn)
    without = resolve(Settings(seed=5, task="reverse"))  # nothing explicit: the draws as before
    assert without.decoys == ("sort=layers.3.self_attn | layers.3.mlp[neuron=48-111]",)
    with pytest.raises(JaxpatchError, match="every decoy of the drawn shape"):  # no room left
        resolve(Settings(plant="layers.0-3.mlp[neuron=48-111]", task="reverse"))


def test_shipped_pair_has_the_planted_behavior() -> None:
    pair = load_planted(default_pair_dir())
    for prompt in pair.prompts[:4]:
        text = " ".join(pair.record["language"]["vocabulary"][t] for t in prompt.tokens)
        assert tuple(pair.base.tokenizer.encode(text).ids) == prompt.tokens
    acc = behavior(pair)
    assert acc["base"] == 0.0 and acc["donor_with_S_from_base"] < 0.05
    assert acc["donor"] >= pair.record["settings"]["target_accuracy"] - 0.02  # decoys may cost 2 points
    assert acc["base_with_S_from_donor"] >= 0.9 * acc["donor"]
    # Independently: S swapped with a 0/1 mask (not a Patch), answers decoded one token at a
    # time with the plain forward (not greedy_continuations), compared with the targets.
    config = pair.base.config
    inside = plant_mask(config, plant_patch(config, pair.plant))
    base, donor = pair.base.params, pair.donor.params
    swapped = {"base_with_S_from_donor": jax.tree_util.tree_map(
                   lambda m, b, d: np.where(m > 0, d, b), inside, base, donor),
               "donor_with_S_from_base": jax.tree_util.tree_map(
                   lambda m, b, d: np.where(m > 0, b, d), inside, base, donor),
               "base": base, "donor": donor}
    expected = {name: _greedy_accuracy(config, params, pair.eval_prompts)
                for name, params in swapped.items()}
    assert acc == expected
    recorded = pair.record["models"]["donor"]["accuracy"]
    assert (recorded["base"], recorded["trained"], recorded["plant_patched_base"]) == (
        acc["base"], acc["donor"], acc["base_with_S_from_donor"])


def test_shipped_pair_records_how_far_every_component_moved() -> None:
    pair = load_planted(default_pair_dir())
    record, settings = pair.record, pair.record["settings"]
    base, donor = flatten_params(pair.base.params), flatten_params(pair.donor.params)
    moved = record["movement"]["module"]
    # Independently of component_entries: a module's norm is over every tensor under its name.
    for name, norm in zip(moved["names"], moved["norm"]):
        keys = [k for k in base if k.startswith(name + ".")]
        assert keys, name
        expected = np.sqrt(sum(((np.asarray(donor[k], np.float64) - np.asarray(base[k], np.float64)) ** 2
                                ).sum() for k in keys))
        assert norm == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    in_s, in_d = np.array(moved["in_S"]), np.array(moved["in_D"])
    assert in_s.any() and in_d.any() and not (in_s & in_d).any()
    # The decoy learned its own task and left the measured one where it was.
    (decoy,) = record["decoys"]
    assert settings["decoys"] == [f"{decoy['task']}={decoy['plant']}"]
    assert decoy["after"] > decoy["before"] + 0.5
    change = decoy["task_accuracy"]["after"] - decoy["task_accuracy"]["before"]
    assert abs(change) <= settings["max_accuracy_change"]
    assert record["rescaled"]["max_logit_change"] == 0.0  # a power-of-two factor is exact
    # |dW| cannot rank S first at any granularity: something outside S moved further.
    for g in ("module", "head", "neuron"):
        m = record["movement"][g]
        norm, inside = np.array(m["norm"]), np.array(m["in_S"])
        assert norm[~inside].max() > norm[inside].min(), g


def test_on_the_decoy_pair_weight_patching_beats_the_weight_difference() -> None:
    from jaxpatch import LogProb, make_batch, sweep
    from jaxpatch.components import select
    from jaxpatch.pair import delta_norms
    from jaxpatch.stats import roc_auc
    from jaxpatch.studies.scoring import planted_labels

    pair = load_planted(default_pair_dir())
    config = pair.base.config
    batch = make_batch(config, pair.prompts, "targets")
    plant = plant_patch(config, pair.plant)
    for g in ("module", "neuron"):
        items = select(config, None, g)
        labels = planted_labels(config, plant, items)
        exact = max(roc_auc(np.abs(sweep(prepare(pair.base, pair.donor, batch, positions="targets"), LogProb(), granularity=g, direction=d, execution=Execution(progress=False)).effect),
                            labels) for d in ("denoise", "noise"))
        weight_difference = roc_auc(delta_norms(config, pair.base.params, pair.donor.params, items), labels)
        assert weight_difference < 0.9 < exact, (g, exact, weight_difference)


def _greedy_accuracy(config, params, prompts) -> float:
    """Share of prompts whose greedy answer equals the target, decoding prompts of one length
    together, one token at a time, with the plain forward over the whole sequence so far."""
    run = jax.jit(lambda p, t: forward(config, p, t).read(None)[:, -1].argmax(-1))
    correct = 0
    by_length: dict[int, list] = {}
    for p in prompts:
        by_length.setdefault(len(p.tokens), []).append(p)
    for group in by_length.values():
        tokens = np.array([p.tokens for p in group], np.int32)
        n = max(len(p.target) for p in group)
        for _ in range(n):
            tokens = np.concatenate([tokens, np.asarray(run(params, tokens))[:, None]], axis=1)
        answers = tokens[:, -n:]
        correct += sum(tuple(a[: len(p.target)]) == p.target for a, p in zip(answers, group))
    return correct / len(prompts)


def test_task_accuracy_counts_exact_answers() -> None:
    pair = load_planted(default_pair_dir())
    prompts = pair.eval_prompts[:16]
    wrong = [dataclasses.replace(p, target=p.target[:-1] + (p.target[-1] + 1,)) for p in prompts]
    donor = (pair.donor.config, pair.donor.params)
    assert task_accuracy(*donor, wrong) == 0.0
    assert task_accuracy(*donor, prompts) > 0.5


def test_the_decoy_objective_holds_the_task_in_the_donor_and_optionally_in_the_base() -> None:
    import jax.numpy as jnp

    from experiments.training import answer_kl, next_token_loss, retaining
    from jaxpatch import apply

    config = model_config(Language.generate(0), 2, 16, 2, 32)
    base, donor = (init_params(config, jax.random.key(i), scale=0.5) for i in (0, 1))
    decoy = plant_patch(config, "layers.0.mlp")
    ids, weights = jnp.array([[2, 5, 9, 11, 4, 7]]), jnp.ones((1, 5))
    batch = (ids, weights, ids, weights)
    donor_side = retaining(config, donor, 1.0)
    assert float(donor_side(donor, batch)) == pytest.approx(float(next_token_loss(config, donor, ids, weights)))
    both = retaining(config, donor, 1.0, base, plant_mask(config, decoy), retain_base=2.0)
    # At the teacher the donor-side term vanishes; the base-side term compares the base with the
    # base that has the decoy set from the donor (built here with a Patch, not the mask).
    expected = (next_token_loss(config, donor, ids, weights)
                + 2.0 * answer_kl(config, base, apply(decoy, base, donor), ids, weights))
    assert float(both(donor, batch)) == pytest.approx(float(expected), rel=1e-5)
    assert float(answer_kl(config, base, apply(decoy, base, donor), ids, weights)) > 1e-4
    with pytest.raises(ValueError, match="needs the base"):
        retaining(config, donor, 1.0, retain_base=1.0)
