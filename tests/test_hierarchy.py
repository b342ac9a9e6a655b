"""Component anchors, supplier x target matrices, and the source-level hierarchy: checked by
hand-computed projections, plain forward runs, a hand-built source -> router -> executor chain,
and the shipped planted pair."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import TraceSearch, prepare
from jaxpatch.cli import main
from jaxpatch.components import select
from jaxpatch.errors import MetricError, SelectorError
from jaxpatch.examples import CHAIN_ANSWER, chain_pair, example_pair
from jaxpatch.hierarchy import SOURCES_ROW, Thresholds, trace_hierarchy
from jaxpatch.hierarchy import tracing as hierarchy_module
from jaxpatch.metrics import ComponentAnchor, LogProb, target_sites
from jaxpatch.models.decoder import forward
from jaxpatch.pair import endpoint_scores, score_patch
from jaxpatch.patch import Patch
from jaxpatch.prompts import make_batch
from jaxpatch.studies.evaluate import default_pair_dir, hierarchy_against_plant, load_planted
from jaxpatch.studies.scoring import plant_patch, planted_labels

EXAMPLE = example_pair()


def _site_at_positions(params, site: str, edit=None) -> np.ndarray:
    """A site's value at the example batch's readout positions, recorded from a plain run."""
    cfg, batch = EXAMPLE.config, EXAMPLE.batch
    store = {}

    def record(name, value):
        value = edit(name, value) if edit else value
        if name == site:
            store[name] = value
        return value

    forward(cfg, params, batch.tokens, batch.mask, edit=record)
    value = np.asarray(store[site], np.float64)
    rows = np.arange(value.shape[0])[:, None]
    return value[rows, np.asarray(batch.positions)]


def _projection_scores(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """By hand: the unit mean donor-minus-base direction and every run's mean projection."""
    v = (outputs["donor"] - outputs["base"]).reshape(len(outputs["base"]), -1).mean(axis=0)
    u = v / np.linalg.norm(v)
    return u, {k: float((x.reshape(len(x), -1) @ u).mean()) for k, x in outputs.items()}


def test_component_anchor_is_the_projection_on_the_mean_output_difference() -> None:
    cfg, base, donor, batch = EXAMPLE.config, EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch
    head = {k: _site_at_positions(m.params, "layers.1.self_attn.heads")[:, :, 2]
            for k, m in (("base", base), ("donor", donor))}
    _, expected = _projection_scores(head)
    _, base_score, donor_score = endpoint_scores(cfg, base, donor, batch,
                                                 ComponentAnchor("layers.1.self_attn[head=2]"))
    np.testing.assert_allclose([base_score, donor_score], [expected["base"], expected["donor"]],
                               rtol=1e-5)
    assert target_sites(cfg, "layers.1.mlp") == (("layers.1.mlp.down_proj", None),)
    assert target_sites(cfg, "layers.0.mlp[neuron=3,5]") == (("layers.0.mlp.neurons", (3, 5)),)


def test_bad_targets_are_refused_with_the_target_named() -> None:
    cfg = EXAMPLE.config
    for target, message in (("layers.7.mlp", "names no module"), ("layers.1", "names 9 modules"),
                            ("layers.*.mlp[neuron=1]", "spans several modules")):
        with pytest.raises(SelectorError, match=message):
            ComponentAnchor(target).check(cfg)
    same = jaxpatch.Model(cfg, EXAMPLE.base.params)
    with pytest.raises(MetricError, match="does not differ between base and donor"):
        endpoint_scores(cfg, EXAMPLE.base, same, EXAMPLE.batch, ComponentAnchor("layers.0.mlp"))


def test_sweep_matrix_equals_each_target_scored_alone_by_the_plain_forward() -> None:
    cfg, base, donor, batch = EXAMPLE.config, EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch
    targets = ("layers.1.self_attn", "layers.0.mlp[neuron=0-3]", "layers.0.self_attn[kv_head=1]",
               "norm")
    items = select(cfg, None, "module")
    matrix = jaxpatch.sweep_matrix(jaxpatch.prepare(base, donor, batch), ComponentAnchor(targets), items, execution=jaxpatch.Execution(progress=False))
    assert matrix.scores.shape == (len(items), len(targets)) and matrix.columns == list(targets)
    for j, target in enumerate(targets):
        metric = ComponentAnchor(target)
        state, b, d = endpoint_scores(cfg, base, donor, batch, metric)
        expected = [score_patch(base, donor, Patch.from_components(cfg, [c]), batch, metric,
                                state=state) for c in items]
        np.testing.assert_allclose(matrix.scores[:, j], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([matrix.base_scores[j], matrix.donor_scores[j]], [b, d], rtol=1e-6)
    # A supplier after a target cannot move it: exactly the base's score.
    late = items.index(next(c for c in items if c.name == "layers.1.mlp.up_proj"))
    assert matrix.recovery[late, 1] == 0.0
    with pytest.raises(MetricError, match="use sweep_matrix"):
        jaxpatch.sweep(jaxpatch.prepare(base, donor, batch), ComponentAnchor(targets), execution=jaxpatch.Execution(progress=False))


def test_activation_matrix_equals_a_hand_built_activation_patch() -> None:
    cfg, base, donor, batch = EXAMPLE.config, EXAMPLE.base, EXAMPLE.donor, EXAMPLE.batch
    supplier, site = "layers.0.mlp.down_proj", "layers.0.mlp.down_proj"
    target_site = "layers.1.self_attn.o_proj"
    donor_value = {}
    forward(cfg, donor.params, batch.tokens, batch.mask,
            edit=lambda s, v: donor_value.setdefault(s, v) if s == site else v)
    patched = _site_at_positions(base.params, target_site,
                                 edit=lambda s, v: donor_value[site] if s == site else v)
    outputs = {k: _site_at_positions(m.params, target_site)
               for k, m in (("base", base), ("donor", donor))}
    u, _ = _projection_scores(outputs)
    expected = float((patched.reshape(len(patched), -1) @ u).mean())
    items = select(cfg, "layers.0", "module")
    matrix = jaxpatch.activation_matrix(jaxpatch.prepare(base, donor, batch), ComponentAnchor(("layers.1.self_attn", "layers.0.mlp")), items, execution=jaxpatch.Execution(progress=False))
    row = [c.name for c in items].index(supplier)
    np.testing.assert_allclose(matrix.scores[row, 0], expected, rtol=1e-5)
    assert matrix.recovery[row, 1] == pytest.approx(1.0)  # its own output: the donor's


def test_the_chain_is_sorted_into_source_router_executor() -> None:
    pair = chain_pair()
    assert not np.array_equal(pair.base.params["layers"][0]["mlp"]["down_proj"]["weight"],
                              pair.donor.params["layers"][0]["mlp"]["down_proj"]["weight"])
    traced = trace_hierarchy(prepare(pair.base, pair.donor, pair.batch), LogProb(), formation_layer=1)
    assert traced.with_role("source") == ["layers.0.mlp.down_proj"]
    router = next(r for r in traced.rows if r.component == "layers.1.self_attn.o_proj")
    assert router.role == "aggregation" and router.weight_score == pytest.approx(0.0, abs=1e-6)
    assert router.supplied == pytest.approx(1.0, abs=1e-4)
    assert "layers.0.mlp.down_proj" in router.reason and router.activation_score > 0.9
    executor = next(r for r in traced.rows if r.component == "layers.2.mlp.down_proj")
    assert executor.role == "execution" and executor.execution > 0.5
    assert traced.role("layers.0.self_attn.q_proj") == "inert"
    assert traced.role("layers.1.mlp.down_proj") == "inert"
    edge = next(e for e in traced.edges if e.target == "layers.1.self_attn.o_proj"
                and e.supplier == "layers.0.mlp.down_proj")
    assert edge.score == pytest.approx(1.0, abs=1e-4) and edge.activation_score == pytest.approx(1.0, abs=1e-4)
    # The anchor layer splits aggregation from execution: anchored after block 2, the executor
    # passes the signal on like the router.
    late = trace_hierarchy(prepare(pair.base, pair.donor, pair.batch), LogProb(), formation_layer=2)
    assert late.role("layers.2.mlp.down_proj") == "aggregation"
    # Thresholds are arguments: demand more of the suppliers than they can give.
    strict = trace_hierarchy(prepare(pair.base, pair.donor, pair.batch), LogProb(), thresholds=Thresholds(supplied=1.5), formation_layer=1)
    assert strict.role("layers.1.self_attn.o_proj") == "inert"
    assert "recovered only" in next(r.reason for r in strict.rows
                                    if r.component == "layers.1.self_attn.o_proj")


def test_each_level_reads_every_target_from_one_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = chain_pair()
    widths: list[int] = []
    real = hierarchy_module.sweep_matrix

    def counting(prepared, metric, candidates, **kwargs):
        widths.append(metric.width)
        return real(prepared, metric, candidates, **kwargs)

    monkeypatch.setattr(hierarchy_module, "sweep_matrix", counting)
    traced = trace_hierarchy(prepare(pair.base, pair.donor, pair.batch), LogProb(), formation_layer=1, search=TraceSearch(depth=2))
    targets = {key: m.columns for key, m in traced.matrices.items() if key.endswith("/weights")}
    assert len(widths) == len(targets) == traced.calls["tracing_sweeps"] <= 2
    assert widths[0] == len(targets["level1/weights"]) > 5  # many targets, one sweep


def test_given_targets_and_selector_are_checked() -> None:
    pair = chain_pair()
    run = (prepare(pair.base, pair.donor, pair.batch), LogProb())
    with pytest.raises(SelectorError, match="layers.9.mlp"):
        trace_hierarchy(*run, search=TraceSearch(targets=("layers.9.mlp",)))
    with pytest.raises(MetricError, match="layers.0.self_attn.q_proj does not differ"):
        trace_hierarchy(*run, search=TraceSearch(targets=("layers.0.self_attn.q_proj",)))
    with pytest.raises(SelectorError, match="matches no component"):
        trace_hierarchy(*run, selector="layers.7")
    traced = trace_hierarchy(*run, formation_layer=1, search=TraceSearch(targets=("layers.1.self_attn",), depth=1))
    assert traced.matrices["level1/weights"].columns == ["layers.1.self_attn"]


@pytest.mark.slow
def test_the_planted_pair_sources_are_the_planted_set() -> None:
    pair = load_planted(default_pair_dir())
    config = pair.base.config
    batch = make_batch(config, pair.prompts, "targets")
    prepared = prepare(pair.base, pair.donor, batch)
    traced = trace_hierarchy(prepared, LogProb())
    # Prepared once: each model's prefix pass ran once for the trace's dozen runs, and each
    # metric (the behavior's, one component anchor per tracing level) was fitted once.
    levels = sum(key.endswith("/weights") for key in traced.matrices)
    assert traced.calls["sweeps"] + traced.calls["validation_sweeps"] >= 6
    assert prepared.counts["prefix_passes"] == 2
    assert prepared.counts["metric_preparations"] == 1 + levels
    items = select(config, None, "module")
    labels = dict(zip([c.name for c in items],
                      planted_labels(config, plant_patch(config, pair.plant), items).tolist()))
    found = hierarchy_against_plant(traced.graph(), labels, Thresholds().activation)
    assert found["precision"] >= 0.9 and found["recall"] >= 0.9
    assert found["sources_outside_S"] == []
    assert found["outside_S_high_activation"] > 0
    assert found["outside_S_high_activation_not_source"] == found["outside_S_high_activation"]
    planted_groups = {"layers.0.self_attn", "layers.1.self_attn", "layers.3.mlp"}
    cited = [name for name, reason in found["downstream_reasons"].items()
             if reason.startswith("aggregation") and any(g in reason for g in planted_groups)]
    assert cited, found["downstream_reasons"]
    assert traced.sources_recovery > 0.9


def test_cli_trace_writes_the_table_graph_and_figure(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    pair = chain_pair()
    jaxpatch.save(pair.base, tmp_path / "base")
    jaxpatch.save(pair.donor, tmp_path / "donor")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"tokens": list(t), "target_tokens": [CHAIN_ANSWER]}) + "\n"
                               for t in ((2, 3, 4), (5, 6), (7, 2, 5, 3))))
    run = ["trace", "--base", str(tmp_path / "base"), "--donor", str(tmp_path / "donor"),
           "--prompts", str(prompts), "--anchor-layer", "1", "--no-progress"]
    assert main([*run, "--out", str(tmp_path / "out")]) == 0
    assert "source (1): layers.0.mlp.down_proj" in capsys.readouterr().out
    header = (tmp_path / "out" / "hierarchy.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["component", "layer", "class", "weight_score", "activation_score",
                          "supplied"] and "reason" in header
    graph = json.loads((tmp_path / "out" / "graph.json").read_text())
    assert {"name", "class"} <= set(graph["nodes"][0]) and graph["edges"]
    assert {"supplier", "target", "score"} <= set(graph["edges"][0])
    assert (tmp_path / "out" / "hierarchy.png").read_bytes()[:4] == b"\x89PNG"
    for bad, words in ((["--select", "layers.9"], "matches no component"),
                       (["--target", "layers.4.mlp"], "names no module"),
                       (["--threshold", "edges=1"], "unknown threshold")):
        assert main([*run, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("jaxpatch: error: ") and words in err


def test_joint_source_rows_leave_the_target_out() -> None:
    rows = hierarchy_module._joint_rows({"a": 0.5, "b": 0.3, "c": 0.1}, ["a", "x"])
    assert rows == {f"{SOURCES_ROW} but a": ["b", "c"], SOURCES_ROW: ["a", "b", "c"]}
    assert hierarchy_module._joint_rows({"a": 0.5}, ["x"]) == {}


def test_a_component_anchor_drives_attribution_and_learned_patches() -> None:
    pair = chain_pair()
    router = ComponentAnchor("layers.1.self_attn")
    learned = jaxpatch.learn_patch(jaxpatch.prepare(pair.base, pair.donor, pair.batch), router, training=jaxpatch.GateTraining(steps=50))
    assert learned.selected == ["layers.0.mlp.down_proj"] and learned.effect == pytest.approx(1.0)
    ranked = jaxpatch.attribute(jaxpatch.prepare(pair.base, pair.donor, pair.batch), router)
    assert ranked.top(1)[0][0] == "layers.0.mlp.down_proj"
    with pytest.raises(MetricError, match="block-by-block gradient"):
        jaxpatch.attribute(jaxpatch.prepare(pair.base, pair.donor, pair.batch), router, execution=jaxpatch.Execution(remat=True))


def test_of_two_redundant_sources_the_smallest_set_keeps_one() -> None:
    """A donor that writes the chain's feature twice (block 0's MLP, and also its attention):
    either group alone recovers the behavior, so the smallest validated set holds one of them.
    The other is not a source: alone in either direction its modules change nothing (the
    remaining copy covers for them), though its output carries the feature."""
    from jaxpatch._tree import unflatten_dotted

    pair = chain_pair()
    flat = dict(jaxpatch.flatten_params(pair.donor.params))
    v = np.array(flat["layers.0.self_attn.v_proj.weight"])
    o = np.array(flat["layers.0.self_attn.o_proj.weight"])
    v[0, 0, 0], o[0, 0, 1] = 1.0, 2.0  # attention copies the constant into feature 1
    flat["layers.0.self_attn.v_proj.weight"] = jnp.asarray(v)
    flat["layers.0.self_attn.o_proj.weight"] = jnp.asarray(o)
    twice = jaxpatch.Model(pair.config, unflatten_dotted(flat))
    traced = trace_hierarchy(prepare(pair.base, twice, pair.batch), LogProb(), formation_layer=1, search=TraceSearch(depth=1))
    sources = traced.with_role("source")
    attention = ["layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj"]
    assert sources in (["layers.0.mlp.down_proj"], attention)
    other = attention[1] if sources == ["layers.0.mlp.down_proj"] else "layers.0.mlp.down_proj"
    row = next(r for r in traced.rows if r.component == other)
    assert row.role == "inert" and row.weight_score < 0.01 and row.activation_score > 0.9
