"""Learned patches: gates trained with a sparsity penalty, on a pair whose answer is known."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from jaxpatch import (
    Execution,
    GateTraining,
    JaxpatchError,
    Model,
    Patch,
    VectorAnchor,
    apply,
    components,
    make_batch,
    prepare,
    sweep,
)
from jaxpatch.examples import EXAMPLE_PROMPTS, random_pair
from jaxpatch.learned import gate_index, learn_patch

SOURCE = {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"}
CANCELLING = {"layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj"}


@functools.lru_cache(maxsize=2)
def constructed(cancelling: bool = True):
    """A donor that differs from its base by a real change to layer 1's MLP (the source) and,
    optionally, by a change that cancels: layer 0's values times 16, its attention output
    divided by 16."""
    base, other = random_pair("llama", seed=3)
    config = base.config
    params = apply(Patch.from_selector(config, "layers.1.mlp"), base.params, other.params)
    if cancelling:
        attn = params["layers"][0]["self_attn"]
        attn["v_proj"] = {"weight": attn["v_proj"]["weight"] * 16.0}
        attn["o_proj"] = {"weight": attn["o_proj"]["weight"] / 16.0}
    donor = Model(config, params)
    batch = make_batch(config, EXAMPLE_PROMPTS)
    return base, donor, batch, VectorAnchor(layer=config.n_layers - 1)


@pytest.mark.parametrize(("direction", "cancelling"), [("denoise", True), ("denoise", False),
                                                       ("noise", False)])
def test_the_learned_patch_is_the_source(direction, cancelling) -> None:
    base, donor, batch, metric = constructed(cancelling)
    learned = learn_patch(prepare(base, donor, batch), metric, direction=direction, sparsity=0.01, training=GateTraining(steps=150))
    assert set(learned.selected) == SOURCE, learned.selected
    assert learned.effect == pytest.approx(1.0, abs=1e-3)
    # Components the donor did not change get only the penalty: their gates close.
    unchanged = [p for n, p in zip(learned.names, learned.probabilities) if n not in SOURCE | CANCELLING]
    assert max(unchanged) < 0.05
    assert learned.curve[-1]["size"] < learned.curve[0]["size"]


def test_reverting_one_of_a_cancelling_pair_destroys_the_behavior_and_is_smallest() -> None:
    # In the noise direction the cancelling pair is real: the donor with its attention output
    # from the base (values still times 16) is broken, so that one module is the smallest set.
    base, donor, batch, metric = constructed()
    learned = learn_patch(prepare(base, donor, batch), metric, direction="noise", sparsity=0.01, training=GateTraining(steps=150))
    assert len(learned.selected) == 1 and set(learned.selected) <= CANCELLING
    assert learned.effect >= 1.0


def test_single_patches_are_fooled_by_what_cancels_and_the_learned_patch_is_not() -> None:
    base, donor, batch, metric = constructed()
    single = sweep(prepare(base, donor, batch), metric, granularity="module", execution=Execution(progress=False))
    effect = dict(zip(single.names, single.effect))
    weakest_source = min(abs(effect[n]) for n in SOURCE)
    assert min(abs(effect[n]) for n in CANCELLING) > weakest_source  # one of v/o alone is a big change
    learned = learn_patch(prepare(base, donor, batch), metric, sparsity=0.01, training=GateTraining(steps=150))
    assert not CANCELLING & set(learned.selected)


def test_a_large_penalty_keeps_nothing() -> None:
    base, donor, batch, metric = constructed()
    learned = learn_patch(prepare(base, donor, batch), metric, sparsity=5.0, training=GateTraining(steps=100))
    assert learned.selected == [] and learned.patch.num_nonzero() == 0
    assert learned.effect == pytest.approx(0.0, abs=1e-6)


def test_gate_index_maps_coefficients_to_their_component_and_refuses_overlaps() -> None:
    base, *_ = constructed()
    config = base.config
    neurons = components(config, "neuron")
    index = gate_index(config, neurons[:3])
    down = np.asarray(index["layers"][0]["mlp"]["down_proj"]["weight"]).ravel()
    assert down[:4].tolist() == [0, 1, 2, -1] and (down[3:] == -1).all()
    assert (np.asarray(index["layers"][1]["mlp"]["down_proj"]["weight"]) == -1).all()
    with pytest.raises(JaxpatchError, match="share coefficients"):
        gate_index(config, [neurons[0], neurons[0]])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"direction": "zero"}, "learned-patch direction"),
    ({"training": GateTraining(steps=0)}, "at least 1"),
    ({"training": GateTraining(temperatures=(1.0, 0.0))}, "positive"),
])
def test_bad_arguments_are_refused(kwargs, message) -> None:
    base, donor, batch, metric = constructed()
    with pytest.raises(JaxpatchError, match=message):
        learn_patch(prepare(base, donor, batch), metric, **kwargs)


def test_cli_learn_writes_the_front_and_refuses_bad_input(tmp_path, capsys) -> None:
    import json

    import jaxpatch
    from jaxpatch.cli import main

    base, donor, _, _ = constructed()
    jaxpatch.save(base, tmp_path / "base")
    jaxpatch.save(donor, tmp_path / "donor")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"tokens": list(p.tokens)}) + "\n" for p in EXAMPLE_PROMPTS))
    run = ["learn", "--base", str(tmp_path / "base"), "--donor", str(tmp_path / "donor"),
           "--prompts", str(prompts), "--anchor-layer", "1", "--steps", "150", "--no-progress"]
    out = tmp_path / "run"
    assert main([*run, "--sparsity", "0.01", "--sparsity", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("sparsity 0.01: 3 of ") and "layers.1.mlp.up_proj" in printed[0]
    assert printed[1].startswith("sparsity 5: 0 of ") and printed[1].endswith("(none)")
    record = json.loads((out / "learned.json").read_text())
    first = record["patches"][0]
    assert set(first["selected"]) == SOURCE and first["size"] == 3
    patch = Patch.from_json(json.dumps(first["patch"]))
    assert patch.num_nonzero() == Patch.from_selector(base.config, "layers.1.mlp").num_nonzero()
    assert (out / "pareto.csv").read_text().splitlines() == [
        "sparsity,size,effect", f"0.01,3,{first['effect']}", f"5.0,0,{record['patches'][1]['effect']}"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # The same command again resumes: both patches are read from the progress log, not learned
    # again (a third sparsity would be), and the outputs are identical.
    import jaxpatch.learned as learned_module

    def never(*args, **kwargs):
        raise AssertionError("learned again")

    written = (out / "learned.json").read_text()
    original, learned_module._steps_function = learned_module._steps_function, never
    try:
        assert main([*run, "--sparsity", "0.01", "--sparsity", "5", "--out", str(out)]) == 0
    finally:
        learned_module._steps_function = original
    assert "resuming the run" in capsys.readouterr().err
    assert (out / "learned.json").read_text() == written
    # Bad input: one line, status 2, nothing written.
    assert main([*run, "--sparsity", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip() == "jaxpatch: error: --sparsity must be at least 0, got -1.0"
    assert main([*run, "--select", "layers.9", "--out", str(tmp_path / "bad")]) == 2
    assert "layers.9" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_prefix_reuse_and_remat_leave_the_gates_as_they_were() -> None:
    from jaxpatch import endpoint_scores, score_patch

    base, donor, batch, metric = constructed()
    # Candidates only in block 1: block 0 runs once; the first step sees every gate at 1/2.
    plain = learn_patch(prepare(base, donor, batch), metric, selector="layers.1", training=GateTraining(steps=30))
    rematted = learn_patch(prepare(base, donor, batch), metric, selector="layers.1", training=GateTraining(steps=30), execution=Execution(remat=True))
    assert plain.names == [c.name for c in components(base.config, "module") if c.layer == 1]
    for a, b in zip(plain.curve, rematted.curve):
        assert a["effect"] == pytest.approx(b["effect"], rel=1e-5, abs=1e-6)
    _, low, high = endpoint_scores(base.config, base, donor, batch, metric)
    half = Patch.from_selector(base.config, "layers.1", strength=0.5)
    expected = (score_patch(base, donor, half, batch, metric) - low) / (high - low)
    assert plain.curve[0]["effect"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(plain.probabilities, rematted.probabilities, atol=1e-4)
