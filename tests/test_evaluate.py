"""The reference experiment on the shipped planted pair, the demo command and its report."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxpatch import ModelConfig, components, init_params
from jaxpatch.cli import main
from jaxpatch.pair import delta_norms
from jaxpatch.studies.evaluate import EVALUATED_METHODS, default_pair_dir
from jaxpatch.studies.report import METHOD_LABELS, read_run, summary_lines


def test_delta_norms_match_direct_computation() -> None:
    cfg = ModelConfig.tiny("llama")
    a, b = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
    items = [c for c in components(cfg, "module") if c.name == "layers.1.mlp.up_proj"]
    items += [c for c in components(cfg, "neuron") if c.name == "layers.0.mlp[neuron=5]"]
    got = delta_norms(cfg, a, b, items)
    mlp_a, mlp_b = a["layers"][0]["mlp"], b["layers"][0]["mlp"]
    neuron = np.concatenate([np.asarray(mlp_b[m]["weight"][:, 5] - mlp_a[m]["weight"][:, 5])
                             for m in ("gate_proj", "up_proj")]
                            + [np.asarray(mlp_b["down_proj"]["weight"][5] - mlp_a["down_proj"]["weight"][5])])
    up = np.asarray(b["layers"][1]["mlp"]["up_proj"]["weight"] - a["layers"][1]["mlp"]["up_proj"]["weight"])
    np.testing.assert_allclose(got, [np.linalg.norm(up), np.linalg.norm(neuron)], rtol=1e-5)


@pytest.mark.slow
def test_demo_writes_a_report_that_re_renders(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--granularity", "module", "--granularity", "head",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("report: ") and len(printed) == 9
    assert printed[-3].startswith("hierarchy (modules): source precision 1.00, recall 1.00")
    assert printed[-2].startswith("faithfulness (denoise, modules): CPR of S's own curve 0.75")
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["granularities"]) == {"module", "head"}
    module = summary["granularities"]["module"]
    assert set(module["auc"]) == set(EVALUATED_METHODS)
    # The planted set: one head (q, o) with its key/value head (k, v) in each of layers 0 and 1,
    # and half of layer 3's MLP neurons (gate, up, down): 11 of the 39 modules.
    assert sum(module["planted"]) == 11
    # Exact weight patching beats the weight difference on the shipped pair's decoys.
    auc = module["auc"]
    assert max(auc["exact-noise"], auc["exact-denoise"]) > auc["delta-norm"] + 0.05
    assert summary["completeness"]["relative_gap"] < 0.05
    html = (out / "report.html").read_text()
    # ROC per granularity, 2 heatmaps each, the hierarchy, a faithfulness figure per direction
    assert html.count("data:image/png;base64,") == 2 + 4 + 1 + 2
    curves = summary["faithfulness"]
    assert set(curves) == {"denoise", "noise"} and set(curves["noise"]) == {"S first", *EVALUATED_METHODS}
    assert all(c["faithfulness"][0] == 0.0 and c["sizes"][-1] == 39 for c in curves["denoise"].values())
    assert "Faithfulness: the top k modules" in html
    assert "Source-level hierarchy" in html and summary["hierarchy"]["planted"]["recall"] == 1.0
    # Each reason folds to its gist (the whole one a click away): the table stays readable.
    assert "<td><details><summary>in the validated source set</summary>in the validated" in html
    assert "What could make this comparison unfair" in html and "<script" not in html
    # The first screen says what was found, before any table or figure, naming the behavior.
    first = html.index("<p class=finding>")
    assert first < html.index("<table") and first < html.index("<img")
    said = html[first: html.index("</p>", first)]
    assert "Behavior: log-probability of the answers of the map task" in said
    assert "The planted set S is separated best by: modules: " in said and "; heads: " in said
    assert "hierarchy&#x27;s sources match S with precision 1.00 and recall 1.00" in said
    best_module = max((a, m) for m, a in module["auc"].items() if m != "random")[1]
    assert METHOD_LABELS[best_module].split(",")[0] in said
    assert html.count("<td class=num><b>") >= 2 + 4  # the best AUC per column, CPR and CMD
    assert "How far the weights moved" in html and summary["pair"]["movement"]["module"]["D_mean"] > 0
    assert (out / "scores" / "head-exact-noise.csv").read_text().startswith("name,score")
    assert (out / "auc.csv").read_text().count("\n") == 1 + 2 * len(EVALUATED_METHODS)
    # `jaxpatch report` re-renders the same report from the saved files.
    summary2, results = read_run(out)
    assert summary2 == summary and len(results) == 2 * 6
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text() == html
    assert summary_lines(summary)[0].startswith("pair: map task, seed 0")
    # A second demo into the same folder replaces the earlier run.
    assert main(["demo", "--out", str(out), "--granularity", "module", "--no-progress"]) == 0
    assert set(json.loads((out / "results.json").read_text())["granularities"]) == {"module"}


def test_demo_and_report_refuse_bad_input(tmp_path, capsys) -> None:
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert main(["demo", "--out", str(keep), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "precious" and len(list(keep.iterdir())) == 1
    assert main(["demo", "--pair", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "planted.json: not found" in err
    assert not (tmp_path / "o").exists()
    assert main(["report", str(keep)]) == 2
    assert "results.json: not found" in capsys.readouterr().err
    (keep / "results.json").write_text('{"format": "something else"}')
    assert main(["report", str(keep)]) == 2
    assert "not a planted-pair evaluation" in capsys.readouterr().err
    assert default_pair_dir().is_dir()


def test_evaluate_reports_as_many_stages_as_it_says_and_runs_no_sweep_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage is reported; the hierarchy reuses the module sweeps and activation runs the
    evaluation made (decision 19), and one prepared pair serves every method."""
    import sys

    from jaxpatch.studies.evaluate import evaluate, load_planted, stage_count

    runs: list[tuple[str, str, str, tuple[str, ...]]] = []
    passes: list[int | None] = []
    engine = {name: sys.modules[f"jaxpatch.engine.{name}"] for name in ("sweep", "activation",
                                                                        "prepared")}

    def counting(kind: str, real):
        def run(pair, metric, candidates, direction, *args):
            names = tuple(f"{k} {v.to_json()}" for k, v in candidates.items()) if isinstance(
                candidates, dict) else tuple(c.name for c in candidates)
            runs.append((kind, repr(metric), direction, names))
            return real(pair, metric, candidates, direction, *args)
        return run

    monkeypatch.setattr(engine["sweep"], "_scores", counting("weights", engine["sweep"]._scores))
    monkeypatch.setattr(engine["activation"], "_activation_scores",
                        counting("activation", engine["activation"]._activation_scores))
    real_pass = engine["prepared"].prefix_pass

    def counted_pass(config, stacked, rest, batch, layer, count):
        passes.append(layer)
        return real_pass(config, stacked, rest, batch, layer, count)

    monkeypatch.setattr(engine["prepared"], "prefix_pass", counted_pass)
    names: list[str] = []

    class Bar:
        def update(self, n: int) -> None: ...

        def close(self) -> None: ...

    def stage(name: str, total: int) -> Bar:
        names.append(name)
        return Bar()

    evaluate(load_planted(default_pair_dir()), granularities=("module",), stage=stage)
    assert len(names) == stage_count(("module",)) and "learned-patch" in names
    assert len(runs) == len(set(runs)) > 8, [r[:3] for r in runs]  # no sweep ran twice
    assert len(passes) == 2  # each model's prefix pass ran once, for every method


def test_narrowed_neuron_evaluation_verifies_a_shortlist_and_measures_recall_on_S() -> None:
    """Neurons not swept exhaustively (as on a real model): only the ranking methods run, the
    IG shortlist is verified exactly, and recall is measured against S's own exact top."""
    from jaxpatch.studies.evaluate import evaluate, load_planted
    from jaxpatch.studies.report import render_html, summary_lines

    pair = load_planted(default_pair_dir())
    ev = evaluate(pair, granularities=("neuron",), exhaustive_neurons=False, verify_fraction=0.1,
                  recall_k=10, learned_steps=2)
    neuron = ev.summary["granularities"]["neuron"]
    assert neuron["exhaustive"] is False
    ran = {m for m, a in neuron["auc"].items() if a is not None}
    assert ran == {"first-order", "integrated-gradients", "delta-norm", "random"}
    assert "neuron/exact-noise" not in ev.results and "neuron/exact-denoise-S" in ev.results
    in_s = ev.results["neuron/exact-denoise-S"]
    assert sum(neuron["planted"]) == len(in_s.names)  # S's neurons, each patched exactly
    v = ev.summary["narrow_then_verify"]
    assert v["reference"] == "planted" and v["verified_fraction"] <= 0.1 + 1e-9
    top = set(np.asarray(in_s.names)[np.argsort(-np.abs(in_s.effect), kind="stable")[:10]])
    shortlist = set(v["shortlist"])
    assert shortlist <= set(ev.results["neuron/verified"].names)
    assert v["recall"] == len(top & shortlist) / 10
    assert "S's exact top 10" in "\n".join(summary_lines(ev.summary))
    assert "Not swept exhaustively (neuron)" in render_html(ev.summary, ev.results)


def test_evaluate_runs_only_the_stages_asked_for() -> None:
    from jaxpatch.errors import InvalidInputError
    from jaxpatch.studies.evaluate import evaluate, load_planted

    pair = load_planted(default_pair_dir())
    ev = evaluate(pair, granularities=("module",), stages=("delta-norm", "random"))
    module = ev.summary["granularities"]["module"]
    assert {m for m, a in module["auc"].items() if a is not None} == {"delta-norm", "random"}
    assert ev.results == {} and ev.summary["metric"]["donor_score"] > ev.summary["metric"]["base_score"]
    with pytest.raises(InvalidInputError, match="unknown stage 'exact'"):
        evaluate(pair, granularities=("module",), stages=("exact",))
