"""The real-model planted pair's pieces: fact draws, masked training, overlap checks, the folder it
writes (the full build takes minutes: `scripts/real_model_table.py` runs it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden import FIXTURES

import jaxpatch
from experiments import planted_real
from experiments.planted_real import Settings, facts
from jaxpatch._tree import flatten_params
from jaxpatch.errors import JaxpatchError
from jaxpatch.prompts import Prompt
from jaxpatch.studies.evaluate import load_planted


def test_facts_are_deterministic_disjoint_and_counterfactual() -> None:
    measured, decoys = facts(Settings(seed=3))
    again, _ = facts(Settings(seed=3))
    other, _ = facts(Settings(seed=4))
    assert measured == again and measured != other
    landmarks = [f.landmark for f in measured + decoys]
    assert len(set(landmarks)) == len(landmarks) == 28
    assert all(f.new_city != f.true_city for f in measured + decoys)
    assert all(p.endswith(("city of", "is")) for p in measured[0].prompts())
    with pytest.raises(JaxpatchError, match="landmarks known"):
        facts(Settings(facts=20, decoy_facts=20))


def test_every_city_is_one_token_of_the_real_tokenizer() -> None:
    from experiments.real_model import gemma3_270m_path
    from jaxpatch.io.gguf import read_gguf
    from jaxpatch.io.gguf_model import gguf_tokenizer

    try:
        tokenizer = gguf_tokenizer(read_gguf(gemma3_270m_path()))
    except JaxpatchError as e:
        pytest.skip(str(e))
    ids = [planted_real._answer_id(tokenizer, c) for c in planted_real.NEW_CITIES]
    assert len(set(ids)) == len(ids)


def test_training_moves_only_the_selected_neurons() -> None:
    model = jaxpatch.load(FIXTURES / "gemma3")
    config, params = model.config, model.params
    selector = "layers.1.mlp[neuron=3-9]"
    batch = planted_real._batch(model.tokenizer, ["the quick brown fox", "a patch"], [5, 7])

    def loss(p: dict, stream: jax.Array) -> jax.Array:
        logits = planted_real._answer_logits(config, p, batch, 0, stream)
        return planted_real._cross_entropy(logits, batch.answers)

    stream = planted_real._stream_before(config, params, batch, 0)
    trained, losses, steps = planted_real._train(config, params, selector, 5, 1e-2, loss, stream,
                                                 None, "t")
    assert steps == 5 and losses[-1] < losses[0]
    before, after = flatten_params(params), flatten_params(trained)
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert changed == {f"layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    down = np.asarray(after["layers.1.mlp.down_proj.weight"]) - np.asarray(before["layers.1.mlp.down_proj.weight"])
    moved_rows = np.flatnonzero(np.abs(down).sum(1))
    assert set(moved_rows) <= set(range(3, 10)) and len(moved_rows) > 0


def test_overlapping_sets_are_refused() -> None:
    config = jaxpatch.ModelConfig.tiny("gemma3_text", n_layers=12, d_ff=1024)
    with pytest.raises(JaxpatchError, match="overlaps S"):
        planted_real._refuse_overlap(config, Settings(plant="layers.6-7.mlp[neuron=0-255]",
                                                      rescale="layers.7.mlp[neuron=200-300]"))
    planted_real._refuse_overlap(config, Settings())  # the defaults are disjoint


def test_written_folder_is_a_planted_pair(tmp_path: Path) -> None:
    model = jaxpatch.load(FIXTURES / "gemma3")
    donor = jax.tree_util.tree_map(lambda x: x, model.params)
    donor["layers"][1]["mlp"]["down_proj"]["weight"] = model.params["layers"][1]["mlp"]["down_proj"][
        "weight"].at[3].add(1.0)
    s = Settings(plant="layers.1.mlp[neuron=3]")
    prompts = [Prompt((2, 5, 6), (7,)), Prompt((2, 8), (9,))]
    built = {"config": model.config, "tokenizer": model.tokenizer,
             "models": {"base": model.params, "donor": donor}, "prompts": (prompts[:1], prompts),
             "record": {"format": planted_real.PAIR_FORMAT,
                        "settings": {**dataclasses.asdict(s), "task": planted_real.TASK}}}
    planted_real.write(built, tmp_path / "pair")
    pair = load_planted(tmp_path / "pair")
    assert pair.plant == s.plant and pair.task == "facts"
    assert pair.prompts == prompts[:1] and pair.eval_prompts == prompts
    assert jnp.array_equal(pair.donor.params["layers"][1]["mlp"]["down_proj"]["weight"],
                           donor["layers"][1]["mlp"]["down_proj"]["weight"])
    with pytest.raises(JaxpatchError, match="exists"):
        planted_real.write(built, tmp_path / "pair")


def test_command_refuses_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    assert planted_real.main(["--out", str(tmp_path / "x")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep").read_text() == "mine"
