"""Planted sets and ROC AUC."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpatch import ModelConfig, SelectorError, components, plant_patch, planted_labels, roc_auc, roc_curve
from jaxpatch.studies.scoring import plant_mask

CFG = ModelConfig.tiny("llama")

labelled = st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=30).filter(
    lambda xs: any(y for _, y in xs) and not all(y for _, y in xs))


def pairwise_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(labelled)
def test_auc_is_the_pairwise_win_rate(items) -> None:
    scores, labels = zip(*items)
    assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels))
    # A monotone transform does not change it; negating the scores mirrors it.
    assert roc_auc(np.exp(np.array(scores, float)), labels) == pytest.approx(roc_auc(scores, labels))
    assert roc_auc(-np.array(scores), labels) == pytest.approx(1 - roc_auc(scores, labels))


@settings(max_examples=100, deadline=None)
@given(labelled)
def test_roc_curve_area_equals_auc(items) -> None:
    scores, labels = zip(*items)
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: ties count half
    assert area == pytest.approx(roc_auc(scores, labels))


def test_auc_edge_cases() -> None:
    assert roc_auc([3, 2, 1], [True, True, False]) == 1.0
    assert roc_auc([1, 2, 3], [True, True, False]) == 0.0
    assert np.isnan(roc_auc([1, 2], [True, True]))
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        roc_auc([1, 2], [True, False, True])


def test_plant_mixes_granularities_and_labels_overlap() -> None:
    plant = plant_patch(CFG, "layers.0.mlp.down_proj | layers.1.self_attn[head=1] | "
                             "layers.1.mlp[neuron=3-4]")
    modules = components(CFG, "module")
    names = [c.name for c, y in zip(modules, planted_labels(CFG, plant, modules)) if y]
    assert names == ["layers.0.mlp.down_proj", "layers.1.self_attn.q_proj",
                     "layers.1.self_attn.o_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj",
                     "layers.1.mlp.down_proj"]
    heads = components(CFG, "head")
    assert [c.name for c, y in zip(heads, planted_labels(CFG, plant, heads)) if y] == [
        "layers.1.self_attn[head=1]"]
    neurons = components(CFG, "neuron")
    assert [c.name for c, y in zip(neurons, planted_labels(CFG, plant, neurons)) if y] == (
        [f"layers.0.mlp[neuron={n}]" for n in range(CFG.d_ff)]  # down_proj rows: every neuron
        + ["layers.1.mlp[neuron=3]", "layers.1.mlp[neuron=4]"])


def test_plant_mask_counts_parameters() -> None:
    mask = plant_mask(CFG, plant_patch(CFG, "layers.1.mlp[neuron=3-4] | norm"))
    mlp = mask["layers"][1]["mlp"]
    assert mlp["gate_proj"]["weight"].sum() == 2 * CFG.d_model
    assert mlp["down_proj"]["weight"][3].sum() == CFG.d_model and mlp["down_proj"]["weight"][5].sum() == 0
    assert mask["norm"]["weight"].sum() == CFG.d_model
    assert mask["layers"][0]["self_attn"]["q_proj"]["weight"].sum() == 0


def test_bad_plant_is_refused() -> None:
    with pytest.raises(SelectorError, match="matches no module, head or neuron"):
        plant_patch(CFG, "layers.7.mlp")
    with pytest.raises(SelectorError):
        plant_patch(CFG, "layers.(1")
