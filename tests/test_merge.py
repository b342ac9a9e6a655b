"""Merging: mergekit's methods reproduced on fixtures mergekit itself merged
(scripts/make_merge_fixtures.py), configuration parsing and its errors, and `jaxpatch merge`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import jaxpatch
from jaxpatch._tree import flatten_params
from jaxpatch.cli import main
from jaxpatch.errors import InvalidInputError, PatchError
from jaxpatch.merge import merge_models, read_config
from jaxpatch.merge.config import parse_config, resolve
from jaxpatch.merge.run import block_fraction
from jaxpatch.models.families import tensor_rules

MERGE = FIXTURES / "merge"
DETERMINISTIC = ("linear", "task_arithmetic", "ties", "ties_unnormalized", "slerp",
                 "dare_ties_dense", "breadcrumbs", "breadcrumbs_ties", "model_stock",
                 "model_stock_filter_wise")


def hf_tensors(model: jaxpatch.Model) -> dict[str, np.ndarray]:
    """A model's tensors as Hugging Face stores them."""
    flat = flatten_params(model.params)
    return {rule.hf_name: rule.to_hf([np.asarray(flat[leaf]) for leaf in rule.leaves])
            for rule in tensor_rules(model.config)}


# llama-ties: experts moved by multiples of 1/64, so cuts fall among equal magnitudes
# (mergekit run with stable sorts, scripts/mergekit_stable.py).
TIED = ("ties", "ties_unnormalized", "breadcrumbs", "breadcrumbs_ties")


@pytest.mark.parametrize(("family", "case"), [(family, case) for family in ("llama", "gpt2")
                                              for case in DETERMINISTIC]
                         + [("llama-ties", case) for case in TIED])
def test_equal_to_mergekit(family: str, case: str) -> None:
    ours = hf_tensors(merge_models(read_config(MERGE / family / f"{case}.yml")))
    reference = load_file(MERGE / family / f"{case}.safetensors")
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        np.testing.assert_allclose(ours[name], tensor, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dare_keeps_density_and_rescales_like_mergekit(family: str) -> None:
    """DARE's mask is random (JAX's draws are not torch's): both keep about `density` of each
    delta and rescale it to the delta's L1 norm."""
    folder = MERGE / family
    base = hf_tensors(jaxpatch.load(folder / "base"))
    expert = hf_tensors(jaxpatch.load(folder / "expert1"))
    ours = hf_tensors(merge_models(read_config(folder / "dare_linear.yml"), seed=3))
    theirs = load_file(folder / "dare_linear.safetensors")
    kept = {"ours": [], "mergekit": []}
    for name in base:
        delta = expert[name] - base[name]
        for who, merged in (("ours", ours[name]), ("mergekit", theirs[name])):
            merged_delta = merged - base[name]
            np.testing.assert_allclose(np.abs(merged_delta).sum(), np.abs(delta).sum(), rtol=1e-4)
            kept[who].append(np.count_nonzero(merged_delta) / merged_delta.size)
    sizes = np.array([base[n].size for n in base])
    for who, shares in kept.items():  # density 0.4, weighted by tensor size
        overall = float(np.sum(np.array(shares) * sizes) / sizes.sum())
        assert abs(overall - 0.4) < 0.03, (who, overall)
    different = merge_models(read_config(folder / "dare_linear.yml"), seed=4)
    assert not np.array_equal(hf_tensors(different)[name], ours[name])


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    def config(**raw: object) -> None:
        parse_config({"merge_method": "ties", "base_model": "base",
                      "models": [{"model": "e", "parameters": {"weight": 1.0}}], **raw}, tmp_path)

    with pytest.raises(InvalidInputError, match="unknown merge_method 'soup'.*linear, task_arithmetic"):
        config(merge_method="soup")
    with pytest.raises(InvalidInputError, match="unknown parameter 'gamma' for ties"):
        config(parameters={"gamma": 0.1})
    with pytest.raises(InvalidInputError, match=r"density must be in \(0, 1\], got 1.5"):
        config(models=[{"model": "e", "parameters": {"weight": 1.0, "density": 1.5}}])
    with pytest.raises(InvalidInputError, match="weight must be a number, got 'heavy'"):
        config(models=[{"model": "e", "parameters": {"weight": "heavy"}}])
    with pytest.raises(InvalidInputError, match="`slices` is not supported"):
        config(slices=[])
    with pytest.raises(InvalidInputError, match="parameter 'weight' of ties is required"):
        config(models=[{"model": "e"}])
    with pytest.raises(InvalidInputError, match="'lambda' is set for the whole merge"):
        config(models=[{"model": "e", "parameters": {"weight": 1.0, "lambda": 2}}])
    with pytest.raises(InvalidInputError, match="slerp merges the base with exactly one"):
        config(merge_method="slerp", parameters={"t": 0.5},
               models=[{"model": "a"}, {"model": "b"}])
    with pytest.raises(InvalidInputError, match="model_stock merges at least two models"):
        config(merge_method="model_stock", models=[{"model": "a"}])
    with pytest.raises(InvalidInputError, match="k must be a whole number of at least 0, got 1.5"):
        config(merge_method="consensus_ta", parameters={"k": 1.5},
               models=[{"model": "a"}, {"model": "b"}])
    with pytest.raises(InvalidInputError, match="unknown parameter 'weight' for model_stock"):
        config(merge_method="model_stock", models=[{"model": "a", "parameters": {"weight": 1}},
                                                    {"model": "b"}])
    partial = parse_config({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "expert1", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}]}}]},
        MERGE / "llama", "partial.yml")
    with pytest.raises(InvalidInputError, match="'weight' resolves to nothing for model.embed"):
        merge_models(partial)
    (tmp_path / "bad.yml").write_text("merge_method: [unclosed\n")
    with pytest.raises(InvalidInputError, match="not YAML"):
        read_config(tmp_path / "bad.yml")


def test_an_expert_of_another_architecture_is_refused(tmp_path: Path) -> None:
    shutil.copytree(MERGE / "llama" / "base", tmp_path / "base")
    shutil.copytree(MERGE / "gpt2" / "expert1", tmp_path / "other")
    (tmp_path / "m.yml").write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                                    "  - model: other\n    parameters: {weight: 1.0}\n")
    with pytest.raises(PatchError, match="base and other differ"):
        merge_models(read_config(tmp_path / "m.yml"))


def test_cli_merge_writes_a_loadable_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "llama"
    shutil.copytree(MERGE / "llama", folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    out = tmp_path / "merged"
    assert main(["merge", str(folder / "ties.yml"), str(out), "--no-progress"]) == 0
    assert "with ties" in capsys.readouterr().out
    merged = hf_tensors(jaxpatch.load(out))
    for name, tensor in load_file(folder / "ties.safetensors").items():
        np.testing.assert_allclose(merged[name], tensor, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert before == {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}  # inputs intact
    (folder / "bad.yml").write_text("merge_method: ties\nbase_model: base\nmodels:\n"
                                    "  - model: expert1\n    parameters: {weight: 1, density: 0}\n")
    for argv, words in (([str(folder / "bad.yml"), str(tmp_path / "x")], "density must be in"),
                        ([str(folder / "ties.yml"), str(out)], "already exists"),
                        ([str(tmp_path / "missing.yml"), str(tmp_path / "y")], "not found")):
        assert main(["merge", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_block_fraction_follows_mergekit() -> None:
    assert [block_fraction(f"model.layers.{i}.mlp.up_proj.weight", 3) for i in range(3)] == [0.0, 0.5, 1.0]
    assert block_fraction("transformer.h.1.attn.c_attn.weight", 2) == 1.0
    assert block_fraction("model.norm.weight", 3) == 0.0 and block_fraction("model.layers.0.x", 1) == 1.0


@given(st.lists(st.floats(-10, 10), min_size=1, max_size=6), st.floats(0, 1))
def test_a_gradient_interpolates_between_its_neighbours(values: list[float], t: float) -> None:
    got = resolve([{"w": values}], "w", "model.layers.0.x", t, None)
    position = t * (len(values) - 1)
    lo, hi = values[int(position)], values[min(len(values) - 1, int(position) + 1)]
    assert min(lo, hi) - 1e-9 <= got <= max(lo, hi) + 1e-9
    assert resolve([{"w": values}], "w", "x", 0.0, None) == values[0]
    assert resolve([{"w": values}], "w", "x", 1.0, None) == pytest.approx(values[-1])


def test_filters_pick_the_first_match_and_models_override_the_top_level() -> None:
    settings = [{"weight": 0.2}, {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]}]
    assert resolve(settings, "weight", "model.layers.0.mlp.up_proj.weight", 0, None) == 0.2
    assert resolve(settings[1:], "weight", "model.layers.0.mlp.up_proj.weight", 0, None) == 0.5
    assert resolve(settings[1:], "weight", "model.embed_tokens.weight", 0, None) == 0.1
    assert resolve([{}], "density", "x", 0, 1.0) == 1.0


def _expert_folders(tmp_path: Path) -> dict[str, Path]:
    """A base and experts from it: A moves layer 0's MLP output, B layer 1's attention output,
    C layer 0's MLP output the other way and layer 1's attention too (so reverting its MLP
    alone undoes less of C than of A)."""
    from jaxpatch.examples import random_pair

    base, _ = random_pair("llama", d_ff=16)
    jaxpatch.save(base, tmp_path / "base")

    def moved(name: str, **shifts: float) -> None:
        from jaxpatch._tree import unflatten_dotted

        flat = dict(flatten_params(base.params))
        for leaf, shift in shifts.items():
            flat[leaf.replace("__", ".")] = flat[leaf.replace("__", ".")] + shift
        jaxpatch.save(jaxpatch.Model(base.config, unflatten_dotted(flat)), tmp_path / name)

    moved("A", layers__0__mlp__down_proj__weight=0.05)
    moved("B", layers__1__self_attn__o_proj__weight=0.05)
    moved("C", layers__0__mlp__down_proj__weight=-0.1, layers__1__self_attn__o_proj__weight=0.2)
    return {n: tmp_path / n for n in ("base", "A", "B", "C")}


def _scores(folders: dict[str, Path], expert: str, out: Path) -> Path:
    """A scores.json of the expert's modules, with the pair's fingerprints (as the CLI writes)."""
    from jaxpatch.examples import EXAMPLE_PROMPTS
    from jaxpatch.runs.fingerprint import checkpoint_fingerprint

    base, donor = jaxpatch.load(folders["base"]), jaxpatch.load(folders[expert])
    batch = jaxpatch.make_batch(base.config, EXAMPLE_PROMPTS)
    result = jaxpatch.sweep(jaxpatch.prepare(base, donor, batch, inputs={"base": {"sha256": checkpoint_fingerprint(base)},
                                    "donor": {"sha256": checkpoint_fingerprint(donor)}}), jaxpatch.KLDivergence(), direction="noise", execution=jaxpatch.Execution(progress=False))
    out.write_text(json.dumps(result.to_dict()))
    return out


def _guided(tmp_path: Path, experts: list[str], conflict: str = "winner",
            extra: str = "") -> jaxpatch.Model:
    lines = ["merge_method: weight_patching", "base_model: base", "models:"]
    for e in experts:
        lines += [f"  - model: {e}", f"    parameters: {{scores: {e}.scores.json}}"]
    lines.append(f"parameters: {{threshold: 0.05, conflict: {conflict}{extra}}}")
    (tmp_path / "g.yml").write_text("\n".join(lines) + "\n")
    return merge_models(read_config(tmp_path / "g.yml"))


def test_score_guided_merge_takes_each_component_from_the_expert_that_carries_it(
        tmp_path: Path) -> None:
    folders = _expert_folders(tmp_path)
    for e in ("A", "B", "C"):
        _scores(folders, e, tmp_path / f"{e}.scores.json")
    flat = {n: flatten_params(jaxpatch.load(f).params) for n, f in folders.items()}
    merged = flatten_params(_guided(tmp_path, ["A", "B"]).params)
    for leaf, value in merged.items():  # disjoint experts: each module from its own expert
        expected = {"layers.0.mlp.down_proj.weight": flat["A"],
                    "layers.1.self_attn.o_proj.weight": flat["B"]}.get(leaf, flat["base"])[leaf]
        np.testing.assert_allclose(value, expected, atol=1e-7, err_msg=leaf)
    leaf = "layers.0.mlp.down_proj.weight"
    effect = {e: next(c["effect"] for c in json.loads((tmp_path / f"{e}.scores.json").read_text())
                      ["components"] if c["name"] == "layers.0.mlp.down_proj") for e in "AC"}
    assert effect["A"] > effect["C"] + 0.01 and effect["C"] >= 0.05  # both carry it; A more
    winner = flatten_params(_guided(tmp_path, ["A", "C"]).params)
    np.testing.assert_allclose(winner[leaf], flat["A"][leaf], atol=1e-7)  # the larger effect wins
    np.testing.assert_allclose(winner["layers.1.self_attn.o_proj.weight"],
                               flat["C"]["layers.1.self_attn.o_proj.weight"], atol=1e-7)
    weighted = flatten_params(_guided(tmp_path, ["A", "C"], "score_weighted").params)[leaf]
    share_a = effect["A"] / (effect["A"] + effect["C"])
    np.testing.assert_allclose(weighted, flat["base"][leaf] + share_a * 0.05 - (1 - share_a) * 0.1,
                               atol=1e-6)
    # Nothing carried: the rest falls back to a data-free merge when asked.
    rest = flatten_params(_guided(tmp_path, ["A", "B"], extra=", rest: task_arithmetic").params)
    np.testing.assert_allclose(rest["norm.weight"], flat["base"]["norm.weight"], atol=1e-7)


def test_a_scores_file_of_another_pair_is_refused(tmp_path: Path) -> None:
    folders = _expert_folders(tmp_path)
    _scores(folders, "A", tmp_path / "A.scores.json")
    shutil.copy(tmp_path / "A.scores.json", tmp_path / "B.scores.json")  # A's scores for B
    with pytest.raises(InvalidInputError, match="B.scores.json: computed on another donor"):
        _guided(tmp_path, ["A", "B"])
    data = json.loads((tmp_path / "A.scores.json").read_text())
    data["components"][0]["name"] = "layers.9.mlp.up_proj"
    (tmp_path / "A.scores.json").write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match="names component 'layers.9.mlp.up_proj'"):
        _guided(tmp_path, ["A"])
    with pytest.raises(InvalidInputError, match="conflict must be one of winner, score_weighted, source_set"):
        _guided(tmp_path, ["A"], conflict="vote")


@pytest.mark.slow
def test_merge_eval_covers_every_combination_and_method(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from jaxpatch.studies.evaluate import default_pair_dir
    from jaxpatch.studies.merge_eval import CONFLICTS, GRID

    out = tmp_path / "eval"
    assert main(["merge-eval", str(default_pair_dir()), "--out", str(out),
                 "--eval-prompts", "8"]) == 0
    document = json.loads((out / "merge_eval.json").read_text())
    assert list(document["combinations"]) == ["map+reverse", "map+sort", "reverse+sort",
                                              "map+reverse+sort"]
    methods = document["combinations"]["map+sort"]["methods"]
    guided = {f"weight_patching ({g}, {c})" for g in ("module", "head", "neuron") for c in CONFLICTS}
    assert set(methods) == {*GRID, *guided, "localize-and-stitch", "tall_masks"}
    assert set(methods["ties"]["accuracy"]) == {"map", "sort"}
    assert methods["ties"]["setting"]["density"] in (0.2, 0.5, 0.8)
    own = document["expert_accuracy"]
    assert document["held_out_items"] == {"map": 8, "reverse": 8, "sort": 8}  # --eval-prompts
    for row in methods.values():  # normalized by each expert's own accuracy
        for task, accuracy in row["accuracy"].items():
            assert row["normalized"][task] == pytest.approx(accuracy / own[task])
        assert row["worst"] <= row["average"]
    # The localizations are right: sort's carried modules alone keep its task; and TALL masks
    # (one masked model per task) keep two experts whose changes barely overlap.
    assert document["carried_alone"]["sort"]["module"] > 0.9
    assert document["base"]["average"] == 0.0
    assert document["combinations"]["reverse+sort"]["methods"]["tall_masks"]["worst"] > 0.9
    assert "layers.2.self_attn.o_proj" in document["localization"]["sort"]["learned"]
    assert document["localization"]["sort"]["method"] == "exact (noise)"
    assert (out / "merge_eval.md").read_text().startswith("| method | map+reverse |")
    # The same command again replays the recorded localizations and merges; others are refused.
    assert main(["merge-eval", str(default_pair_dir()), "--out", str(out),
                 "--eval-prompts", "8"]) == 0
    again = json.loads((out / "merge_eval.json").read_text())
    assert again["combinations"] == document["combinations"]
    assert again["localization"] == document["localization"]
    assert "resuming the run" in capsys.readouterr().err
    assert main(["merge-eval", str(default_pair_dir()), "--out", str(out)]) == 2
    assert "eval_prompts is 128 (the recorded run had 8)" in capsys.readouterr().err


def test_merge_eval_refuses_to_write_into_its_experts(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "experts").mkdir()
    assert main(["merge-eval", str(tmp_path / "experts"), "--out",
                 str(tmp_path / "experts" / "run")]) == 2
    assert "lies inside the expert folder" in capsys.readouterr().err
    assert list((tmp_path / "experts").iterdir()) == []


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                     st.text(max_size=6), st.sampled_from(["ties", "slerp", "linear", "weight",
                                                           "density", "mlp", "base", "e"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["model", "parameters", "weight", "density", "filter", "value", "t", "lambda",
         "normalize", "scores", "conflict", "rest"]), inner, max_size=3)), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["merge_method", "base_model", "models", "parameters",
                                        "dtype", "slices", "extra"]), _VALUES, max_size=5))
def test_any_configuration_parses_or_is_refused_in_one_line(raw: dict) -> None:
    """Whatever the YAML holds, parsing gives a configuration or jaxpatch's own error."""
    try:
        parse_config(raw, Path("."))
    except InvalidInputError as e:
        assert "\n" not in str(e)


def test_consensus_keeps_what_k_experts_masks_agree_on() -> None:
    """Consensus task arithmetic against the TALL-masks paper's definitions computed here in
    numpy: at k = 0 it is task arithmetic; at mask_lambda = 0 every moved element is in every
    mask; elements kept by fewer than k masks stay the base's."""
    from jaxpatch.merge import methods

    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 5)).astype(np.float32)
    experts = base + rng.normal(size=(3, 6, 5)).astype(np.float32) * np.array([1, 0.3, 0.1],
                                                                                np.float32)[:, None, None]
    weights = np.array([1.0, 0.5, 2.0], np.float32)
    tau = experts - base
    masks = np.abs(tau) > 0.4 * np.abs(tau.sum(0) - tau)
    np.testing.assert_array_equal(np.asarray(methods.tall_masks(base, experts, 0.4)), masks)
    for k in (0, 1, 2, 3):
        expected = base + 0.8 * np.where(masks.sum(0) >= k, (tau * weights[:, None, None]).sum(0), 0)
        got = methods.consensus_ta(base, experts, weights, 0.8, 0.4, k)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)
    arithmetic = methods.task_arithmetic(base, experts, weights, lam=0.8)
    np.testing.assert_allclose(np.asarray(methods.consensus_ta(base, experts, weights, 0.8, 0.4, 0)),
                               np.asarray(arithmetic), atol=1e-6)
    np.testing.assert_allclose(np.asarray(methods.consensus_ta(base, experts, weights, 0.8, 0.0, 3)),
                               np.asarray(arithmetic), atol=1e-6)
    cfg = parse_config({"merge_method": "consensus_ta", "base_model": "base",
                        "models": [{"model": "expert1"}, {"model": "expert2"}, {"model": "expert3"}],
                        "parameters": {"k": 2, "mask_lambda": 0.4}}, MERGE / "llama")
    merged = hf_tensors(merge_models(cfg))
    loaded = [hf_tensors(jaxpatch.load(MERGE / "llama" / n)) for n in ("base", "expert1", "expert2",
                                                                          "expert3")]
    name = "model.layers.1.mlp.down_proj.weight"
    b, e = loaded[0][name], np.stack([m[name] for m in loaded[1:]])
    t = e - b
    keep = (np.abs(t) > 0.4 * np.abs(t.sum(0) - t)).sum(0) >= 2
    np.testing.assert_allclose(merged[name], b + np.where(keep, t.sum(0), 0), atol=1e-6)
    assert 0 < keep.mean() < 1


def test_source_set_conflict_gives_every_contested_coefficient_to_the_strongest_set() -> None:
    from jaxpatch.merge.guided import guided_coefficients, source_set_priority

    # Expert 0 wins the first coefficient by its own effect, expert 1 the second; as sets,
    # expert 1 carries more (0.35 + 0.6 against 0.5 + 0.2) and takes both contested ones.
    maps = [np.array([0.5, 0.2, 0.0]), np.array([0.35, 0.6, 0.3])]
    effects = [{"a": 0.5, "b": 0.2}, {"a": 0.35, "b": 0.6}]
    assert source_set_priority(effects, 0.1) == [0.7, 0.95]
    winner, _ = guided_coefficients(maps, [1.0, 1.0], 0.1, "winner")
    assert winner.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    by_set, covered = guided_coefficients(maps, [1.0, 1.0], 0.1, "source_set", [0.7, 0.95])
    assert by_set.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert covered.tolist() == [True, True, True]
    # An uncontested coefficient stays with its only carrier, whatever the priorities.
    alone, _ = guided_coefficients([np.array([0.5, 0.0]), np.array([0.0, 0.3])], [1.0, 1.0],
                                   0.1, "source_set", [0.1, 9.0])
    assert alone.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def _ranked_mask(delta: np.ndarray, k: int, skip: int, ties: str) -> np.ndarray:
    """The definition, as mergekit's sorts would rank with a stable sort: TIES' descending
    sort keeps ranks [skip, skip + k) ("earlier"); Model Breadcrumbs' ascending sort keeps
    ranks [size - skip - k, size - skip) ("later")."""
    if ties == "earlier":
        order = np.argsort(-np.abs(delta), kind="stable")
        low = skip
    else:
        order = np.argsort(np.abs(delta), kind="stable")
        low = delta.size - skip - k
    ranks = np.empty(delta.size, np.int64)
    ranks[order] = np.arange(delta.size)
    return ((ranks >= low) & (ranks < low + k)).astype(np.float32)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 5, 24]), st.sampled_from(["earlier", "later"]), st.data())
def test_magnitude_mask_keeps_the_ranks_of_a_stable_sort(size: int, ties: str,
                                                          data: st.DataObject) -> None:
    from jaxpatch.merge.methods import magnitude_mask

    values = data.draw(st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -2.0, 3.0, 1e-30,
                                                 float("inf")]), min_size=size, max_size=size))
    delta = np.asarray(values, np.float32)  # sizes x tie rules: six compiled programs (jit caches)
    k = data.draw(st.integers(0, delta.size))
    skip = data.draw(st.integers(0, delta.size - k))
    got = np.asarray(jax.jit(magnitude_mask, static_argnames="ties")(
        jnp.asarray(delta), jnp.int32(k), jnp.int32(skip), ties=ties))
    np.testing.assert_array_equal(got, _ranked_mask(delta, k, skip, ties))
