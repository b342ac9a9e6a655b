"""What a new user meets first: the CLI's defaults agree with the demo, say what they are, and
print the largest effects by size."""

from __future__ import annotations

import json

import pytest

from jaxpatch.cli import build_parser, main
from jaxpatch.studies.evaluate import default_pair_dir


def test_a_default_sweep_of_the_shipped_pair_reads_the_answers_as_the_demo_does(
        tmp_path, capsys) -> None:
    folder = default_pair_dir()
    run = ["sweep", "--base", str(folder / "base"), "--donor", str(folder / "donor"),
           "--prompts", str(folder / "prompts" / "map.jsonl"), "--no-progress"]
    assert main([*run, "--out", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "default" / "scores.json").read_text())
    assert record["metric"] == "logprob" and record["positions"] == "targets"
    effects = {c["name"]: c["effect"] for c in record["components"]}
    by_size = sorted(effects, key=lambda n: -abs(effects[n]))
    rows = [line.split() for line in printed.splitlines() if line.startswith(("layers.", "embed",
                                                                              "lm_head", "norm"))]
    assert [r[0] for r in rows] == by_size[:10]  # largest |effect| first, sign shown
    assert all(r[1][0] in "+-" for r in rows)
    assert any(effects[n] < 0 for n in by_size[:10])  # a negative effect is among the printed
    assert main([*run, "--metric", "anchor", "--out", str(tmp_path / "anchor")]) == 0
    assert json.loads((tmp_path / "anchor" / "scores.json").read_text())["positions"] == "last"


@pytest.mark.parametrize("flag", ["--metric", "--granularity", "--direction", "--positions"])
def test_help_says_each_default(flag, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:"):]  # the flags' descriptions, not the usage line
    start = text.index(flag + " {")
    assert "default" in text[start: text.index(" --", start + len(flag))]
