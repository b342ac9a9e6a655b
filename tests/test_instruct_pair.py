"""The instruction-tuned pair builder on a tiny random Gemma 3 (the real build is minutes to tens
of minutes and runs by its command): the data, the frozen embeddings, the checks and the
folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import jaxpatch
from experiments.instruct_pair import Settings, _check, examples, write
from jaxpatch.errors import JaxpatchError

pytestmark = pytest.mark.slow


def test_the_builder_trains_every_block_and_nothing_else(tiny_instruct_build: dict,
                                                        tmp_path: Path) -> None:
    built = tiny_instruct_build
    base = built["base"]
    donor = built["donor"]
    np.testing.assert_array_equal(donor.params["embed_tokens"]["weight"],
                                  base.params["embed_tokens"]["weight"])
    for i in range(base.config.n_layers):
        assert not np.array_equal(donor.params["layers"][i]["mlp"]["down_proj"]["weight"],
                                  base.params["layers"][i]["mlp"]["down_proj"]["weight"])
    record = built["record"]
    assert record["training"]["steps"] == 3
    assert set(record["rates"]["donor"]) == {"capitals", "lowercase", "no-commas", "quoted", "title",
                                             "sections", "highlighted", "ends-with"}
    assert record["movement"]["embed_tokens"] == 0.0 and record["movement"]["layers.0.mlp.up_proj"] > 0
    write(built, tmp_path / "pair")
    again = jaxpatch.load(tmp_path / "pair" / "donor")
    assert again.chat_template is not None and "<start_of_turn>" in again.chat_template.source
    line = json.loads((tmp_path / "pair" / "prompts" / "capitals.jsonl").read_text().splitlines()[0])
    assert line["instruction"].startswith("What is a waterfall? Your entire response should be")
    assert json.loads((tmp_path / "pair" / "instruct.json").read_text())["format"] == "jaxpatch.instruct/1"


def test_the_checks_name_what_fell_short() -> None:
    record = {"rates": {"donor": {"capitals": 0.5}, "base": {"capitals": 0.0}},
              "held_out_text_loss": {"base": 3.0, "donor": 3.1}}
    with pytest.raises(JaxpatchError, match="the donor follows 'capitals' in 50% of held-out"):
        _check(record, Settings())
    record["rates"]["donor"]["capitals"] = 1.0
    record["rates"]["base"]["capitals"] = 0.5
    with pytest.raises(JaxpatchError, match="the base already follows 'capitals' in 50%"):
        _check(record, Settings())
    record["rates"]["base"]["capitals"] = 0.0
    record["held_out_text_loss"]["donor"] = 3.5
    with pytest.raises(JaxpatchError, match="the donor lost language modeling"):
        _check(record, Settings())
    _check(record, dataclasses.replace(Settings(), max_text_loss_increase=1.0))


def test_response_positions_predict_the_response() -> None:
    e = examples([([7, 8, 9], [1, 2]), ([5, 6], [3])])
    for row in range(2):
        for k in range(int(e.weights[row].sum())):
            assert e.tokens[row, e.positions[row, k] + 1] == e.targets[row, k]
