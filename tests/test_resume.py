"""Long runs survive: resume after a kill (bit for bit), refusal of another run's folder,
torn and damaged progress logs, running out of memory, full disks."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from golden import FIXTURES

import jaxpatch
from jaxpatch import Execution, Verification, prepare
from jaxpatch.attribution import attribute
from jaxpatch.cli import main
from jaxpatch.engine import sweep
from jaxpatch.engine.activation import activation_patching
from jaxpatch.errors import (
    CorruptProgressError,
    JaxpatchError,
    OutputExistsError,
    OutputWriteError,
    RunMismatchError,
)
from jaxpatch.examples import example_pair
from jaxpatch.hierarchy import trace_hierarchy
from jaxpatch.localization import localize
from jaxpatch.runs import log as runlog
from jaxpatch.runs.log import LOG_NAME, RunLog

PROMPTS = ('{"text": "the quick brown fox", "target": " jumps", "foil": " dog"}\n'
           '{"tokens": [5, 6, 7, 8, 9, 10], "target_tokens": [11], "foil_tokens": [12]}\n')


def cut_log(folder: Path, keep: int, torn: bool = True) -> None:
    """Keeps the header and the first `keep` records of a run's log, plus half a line."""
    lines = (folder / LOG_NAME).read_bytes().split(b"\n")
    kept = b"\n".join(lines[: keep + 1]) + b"\n"
    (folder / LOG_NAME).write_bytes(kept + (lines[keep + 1][:40] if torn else b""))


def plain_and_resumed(folder: Path, run: Callable[[RunLog | None], Any],
                      fraction: float) -> tuple[Any, Any]:
    """`run` without a log; then with one, cut to `fraction` of its records, and resumed."""
    plain = run(None)
    with RunLog.open(folder, {}) as log:
        run(log)
        total = len(log.records)
    cut_log(folder, int(total * fraction))
    with RunLog.open(folder, {}) as log:
        assert 0 < log.resumed < total
        return plain, run(log)


# ----------------------------------------------------------------------------- the log itself

def test_a_torn_last_line_is_dropped_and_a_damaged_one_refused(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, {"a": 1}) as log:
        for i in range(3):
            log.task("t").record_chunk([f"c{i}"], np.array([float(i)]))
    cut_log(tmp_path, 2)
    with RunLog.open(tmp_path, {"a": 1}) as log:
        assert log.resumed == 2 and log.task("t").replay(["c0", "c1", "c2"], 2) is None
        assert log.task("t").replay(["c0", "c1"], 1).tolist() == [1.0]
    assert (tmp_path / LOG_NAME).read_bytes().endswith(b"\n")  # the torn tail was cut off
    lines = (tmp_path / LOG_NAME).read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"c0"', b'"cX"')  # a flipped byte in the middle
    (tmp_path / LOG_NAME).write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptProgressError, match=f"{LOG_NAME}:2: damaged"):
        RunLog.open(tmp_path, {"a": 1})
    with RunLog.open(tmp_path, {"a": 1}, overwrite=True) as log:  # --overwrite starts afresh
        assert log.resumed == 0


def test_another_runs_folder_is_refused_naming_each_difference(tmp_path: Path) -> None:
    RunLog.open(tmp_path, {"command": "sweep", "arguments": {"granularity": "module"}}).close()
    with pytest.raises(RunMismatchError) as e:
        RunLog.open(tmp_path, {"command": "sweep", "arguments": {"granularity": "neuron"}})
    assert "arguments.granularity is neuron (the recorded run had module)" in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds no jaxpatch progress log"):
        RunLog.open(tmp_path / "other", {})


def test_a_second_process_cannot_write_the_same_folder(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, {}):
        script = ("import sys; from jaxpatch.runs.log import RunLog\n"
                  f"RunLog.open({str(tmp_path)!r}, {{}})")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert "another jaxpatch run is writing to this folder" in done.stderr


# ---------------------------------------------------------------- resuming, bit for bit

@pytest.fixture(scope="module")
def neuron_reference() -> tuple:
    pair = example_pair()
    metric = jaxpatch.KLDivergence()
    result = sweep(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=4, progress=False))
    return pair, metric, result


def test_a_resumed_sweep_equals_an_uninterrupted_one_bit_for_bit(tmp_path: Path,
                                                                 neuron_reference: tuple) -> None:
    pair, metric, reference = neuron_reference
    with RunLog.open(tmp_path, {}) as log:
        sweep(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=4, progress=False, log=log.task("sweep")))
        chunks = len(log.records) - 1  # the memory plan is a record too
    for keep in (1, chunks // 2, chunks):
        cut_log(tmp_path, keep, torn=keep < chunks)
        with RunLog.open(tmp_path, {}) as log:
            resumed = sweep(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=4, progress=False, log=log.task("sweep")))
        assert resumed.names == reference.names
        assert resumed.scores.tobytes() == reference.scores.tobytes()
        assert resumed.timing.get("resumed_candidates", 0) == 4 * (keep - 1)


def test_resumed_activation_patching_attribution_and_localize_are_identical(tmp_path: Path) -> None:
    pair = example_pair()
    metric = jaxpatch.VectorAnchor(layer=pair.config.n_layers - 1)

    def run(log: RunLog | None) -> tuple:
        task = (lambda name: log.task(name)) if log else (lambda name: None)
        return (activation_patching(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=8, progress=False, log=task("act"))),
                attribute(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", method="integrated-gradients", steps=4, execution=Execution(log=task("ig"))),
                localize(prepare(pair.base, pair.donor, pair.batch), metric, verify=Verification(top_k=6, controls=6, exhaustive=True), execution=Execution(progress=False, log=task("localize"))))

    plain, resumed = plain_and_resumed(tmp_path, run, 0.5)
    assert resumed[0].scores.tobytes() == plain[0].scores.tobytes()
    assert resumed[1].scores.tobytes() == plain[1].scores.tobytes()
    assert resumed[2].to_dict()["exact"]["components"] == plain[2].to_dict()["exact"]["components"]
    assert resumed[2].exhaustive.scores.tobytes() == plain[2].exhaustive.scores.tobytes()


def test_resumed_generation_under_patches_gives_the_same_tokens(tmp_path: Path) -> None:
    from jaxpatch.engine.generation import generate_under_patches
    from jaxpatch.prompts import Prompt

    pair = example_pair()
    patches = {c.name: jaxpatch.Patch.from_components(pair.config, [c]) for c in
               jaxpatch.select(pair.config, "layers.0-1.mlp.*_proj", "module")}
    prompts = [Prompt((5, 9, 2, 7)), Prompt((4, 8))]

    def run(log: RunLog | None) -> dict:
        return generate_under_patches(
            prepare(pair.base, pair.donor, pair.batch), patches, prompts, 5,
            execution=Execution(chunk_size=2, progress=False, log=log and log.task("gen")))

    plain, resumed = plain_and_resumed(tmp_path, run, 0.5)
    assert list(resumed) == list(plain)
    assert all(resumed[n].tolist() == plain[n].tolist() for n in plain)
    assert all(v.dtype == np.int32 for v in resumed.values())


def test_a_resumed_trace_finds_the_same_hierarchy(tmp_path: Path) -> None:
    from jaxpatch.examples import chain_pair

    pair = chain_pair()

    def run(log: RunLog | None) -> dict:
        traced = trace_hierarchy(prepare(pair.base, pair.donor, pair.batch), jaxpatch.LogProb(), formation_layer=1, execution=Execution(log=log.task("trace") if log else None))
        graph = traced.graph()
        graph.pop("timing", None)
        return graph

    plain, resumed = plain_and_resumed(tmp_path, run, 0.3)
    assert resumed == plain


# ------------------------------------------------------------ killed processes, via the CLI

def _record_count(folder: Path) -> int:
    try:
        return (folder / LOG_NAME).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_a_neuron_sweep_killed_at_random_points_resumes_to_identical_scores(
        tmp_path: Path, donor_dir: Path) -> None:
    """SIGKILL a `jaxpatch sweep --granularity neuron` several times at random points of its
    progress; each restart continues; the final scores equal an uninterrupted run's, bit
    for bit."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    env = {**os.environ, "JAXPATCH_COMPILE_CACHE": str(tmp_path / "xla")}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "jaxpatch.cli", "sweep", "--base", str(FIXTURES / "llama-gqa"),
                "--donor", str(donor_dir), "--prompts", str(prompts), "--granularity", "neuron",
                "--metric", "kl", "--chunk-size", "2", "--no-progress", "--out", str(out)]

    subprocess.run(command(tmp_path / "reference"), check=True, env=env, capture_output=True)
    total = _record_count(tmp_path / "reference")
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    for fraction in (0.15, 0.4, 0.65, 0.85):
        target = int(total * fraction) + rng.randrange(-2, 3)
        process = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None and _record_count(out) < target:
            time.sleep(0.002)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        assert not (out / "scores.json").exists() or process.returncode == 0
    assert kills >= 3, "the runs finished before they could be killed"
    final = subprocess.run(command(out), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert "resuming the run" in final.stderr
    scores = [json.loads((folder / "scores.json").read_text())["components"]
              for folder in (tmp_path / "reference", out)]
    assert [c["score"] for c in scores[0]] == [c["score"] for c in scores[1]]
    assert [c["name"] for c in scores[0]] == [c["name"] for c in scores[1]]


@pytest.mark.parametrize(("signum", "status", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                         (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_command_says_in_one_line_what_was_kept_and_resumes(
        tmp_path: Path, signum: int, status: int, word: str) -> None:
    from jaxpatch.studies.evaluate import default_pair_dir

    pair = default_pair_dir()  # 512 neurons, one per chunk: a run long enough to interrupt
    out = tmp_path / "run"
    # Python started with SIGINT ignored (a suite run in the background by a shell) keeps
    # ignoring it; restore what a terminal gives, before jaxpatch starts
    terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('jaxpatch.cli', run_name='__main__', alter_sys=True)")
    command = [sys.executable, "-c", terminal, "sweep", "--base", str(pair / "base"),
               "--donor", str(pair / "donor"), "--prompts", str(pair / "prompts" / "map.jsonl"),
               "--granularity", "neuron", "--chunk-size", "1", "--no-progress", "--out", str(out),
               "--overwrite"]
    env = {**os.environ, "JAXPATCH_COMPILE_CACHE": str(tmp_path / "xla")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    while process.poll() is None and _record_count(out) < 4:
        time.sleep(0.002)
    process.send_signal(signal.SIGSTOP)  # frozen mid-run, so the signal cannot arrive too late
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signum)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate()
    assert process.returncode == status, stderr
    said = [line for line in stderr.splitlines() if line.startswith("jaxpatch:")]
    assert len(said) == 1 and "Traceback" not in stderr, stderr
    assert said[0].startswith(f"jaxpatch: {word}; the ")
    assert "are kept; resume with the same command: jaxpatch sweep --base" in said[0]
    assert "--overwrite" not in said[0]
    assert not (out / "scores.json").exists()
    resumed = subprocess.run(command[:-1], env=env, capture_output=True, text=True)  # no --overwrite
    assert resumed.returncode == 0 and "resuming the run" in resumed.stderr
    assert (out / "scores.json").exists()


def test_a_closed_output_pipe_ends_a_command_quietly(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    import io

    class ClosedPipe(io.StringIO):  # what `jaxpatch info ... | head -1` writes into once head exits
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info", str(FIXTURES / "gpt2")]) == 0
    assert capsys.readouterr().err == ""


def test_the_cli_resumes_refuses_other_settings_and_starts_afresh_with_overwrite(
        tmp_path: Path, donor_dir: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    out = tmp_path / "run"
    run = ["sweep", "--base", str(FIXTURES / "llama-gqa"), "--donor", str(donor_dir),
           "--prompts", str(prompts), "--no-progress", "--out", str(out)]
    assert main([*run, "--granularity", "head"]) == 0
    first = (out / "scores.json").read_text()
    assert main([*run, "--granularity", "head"]) == 0  # finished: replayed, nothing recomputed
    assert "read from the progress log" in capsys.readouterr().out
    again = json.loads((out / "scores.json").read_text())
    assert again["components"] == json.loads(first)["components"]
    assert main([*run, "--granularity", "module"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "arguments.granularity is module (the recorded run had head)" in error
    prompts.write_text(PROMPTS.replace("quick", "slow"))
    assert main([*run, "--granularity", "head"]) == 2
    assert "inputs.prompts is" in capsys.readouterr().err
    assert main([*run, "--granularity", "module", "--overwrite"]) == 0
    assert len(json.loads((out / "scores.json").read_text())["components"]) == 21  # modules


# --------------------------------------------------------------------- memory and disk

@pytest.mark.parametrize("method", ["sweep", "activation"])
def test_running_out_of_memory_halves_the_chunk_with_the_same_scores(
        method: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        neuron_reference: tuple, tmp_path: Path) -> None:
    """A fake allocator limit: any chunk of more than 3 candidates fails as XLA does (weight
    sweeps and activation patching share the chunk runner, so both halve)."""
    chunks = sys.modules["jaxpatch.engine.chunks"]
    pair, metric, reference = neuron_reference
    prepared = prepare(pair.base, pair.donor, pair.batch)
    real = chunks._run_chunk

    def run(chunk_size: int, log=None):
        execution = Execution(chunk_size=chunk_size, progress=False, log=log)
        if method == "sweep":
            return sweep(prepared, metric, granularity="neuron", execution=execution)
        return activation_patching(prepared, metric, granularity="neuron", execution=execution)

    def limited(program, size, chunk, ops, mesh):
        if size > 3:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(program, size, chunk, ops, mesh)

    unlimited = run(16)
    monkeypatch.setattr(chunks, "_run_chunk", limited)
    with RunLog.open(tmp_path, {}) as log:
        halved = run(16, log.task("s"))
        assert log.task("s").limit == 2
    assert [r.getMessage() for r in caplog.records] == [
        "jaxpatch: out of device memory at 16 candidates per chunk; continuing with 8",
        "jaxpatch: out of device memory at 8 candidates per chunk; continuing with 4",
        "jaxpatch: out of device memory at 4 candidates per chunk; continuing with 2"]
    np.testing.assert_allclose(halved.scores, unlimited.scores, rtol=1e-6, atol=1e-7)
    if method == "sweep":
        np.testing.assert_allclose(halved.scores, reference.scores, rtol=1e-6, atol=1e-7)
    assert halved.scores.tobytes() == run(2).scores.tobytes()
    monkeypatch.setattr(chunks, "_run_chunk", lambda *a: (_ for _ in ()).throw(
        RuntimeError("RESOURCE_EXHAUSTED: out of memory")))
    with pytest.raises(JaxpatchError, match="out of device memory with one candidate per chunk"):
        run(1)


def test_a_full_disk_fails_cleanly_and_the_run_resumes(monkeypatch: pytest.MonkeyPatch,
                                                        neuron_reference: tuple,
                                                        tmp_path: Path) -> None:
    pair, metric, reference = neuron_reference
    real_write, writes = os.write, []

    def filling(fd: int, data: bytes) -> int:
        writes.append(len(data))
        if len(writes) > 6:  # the header, the memory plan, then 4 chunks fit
            real_write(fd, data[: len(data) // 2])  # a partial write, as a full disk gives
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(runlog.os, "write", filling)
    with pytest.raises(OutputWriteError, match="No space left on device.*4 chunks recorded"):
        with RunLog.open(tmp_path, {}) as log:
            sweep(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=4, progress=False, log=log.task("s")))
    monkeypatch.setattr(runlog.os, "write", real_write)
    assert (tmp_path / LOG_NAME).read_bytes().endswith(b"\n")  # no torn line left behind
    with RunLog.open(tmp_path, {}) as log:
        assert log.resumed == 5
        resumed = sweep(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=4, progress=False, log=log.task("s")))
    assert resumed.scores.tobytes() == reference.scores.tobytes()


def test_an_unwritable_output_folder_is_refused_in_one_line(tmp_path: Path, donor_dir: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    run = ["sweep", "--base", str(FIXTURES / "llama-gqa"), "--donor", str(donor_dir),
           "--prompts", str(prompts), "--no-progress", "--out"]
    (tmp_path / "file").write_text("not a folder")
    assert main([*run, str(tmp_path / "file" / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot write (Not a directory)" in error
    if os.geteuid() != 0:  # permissions do not bind root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert main([*run, str(locked / "run")]) == 2
        finally:
            locked.chmod(0o700)
        assert "cannot write (Permission denied)" in capsys.readouterr().err
        assert not (locked / "run").exists()


def test_scores_repeat_bit_for_bit_and_chunk_sizes_agree_to_float32_rounding(
        neuron_reference: tuple) -> None:
    """What determinism means here (docs/decisions/0016): the same chunk size repeats to the
    bit; other chunk sizes reduce in another order and agree to rounding."""
    pair, metric, reference = neuron_reference
    again = sweep(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=4, progress=False))
    assert again.scores.tobytes() == reference.scores.tobytes()
    scale = np.abs(reference.scores).max()
    for chunk in (1, 3, 64):
        other = sweep(prepare(pair.base, pair.donor, pair.batch), metric, granularity="neuron", execution=Execution(chunk_size=chunk, progress=False))
        assert np.abs(other.scores - reference.scores).max() <= 8 * np.finfo(np.float32).eps * scale


def test_a_well_formed_line_with_a_malformed_record_is_refused(tmp_path: Path) -> None:
    """A record whose checksum holds but whose content is not a record (written by hand)."""
    from jaxpatch.runs.log import _line

    with RunLog.open(tmp_path, {}) as log:
        log.task("t").record_chunk(["a"], np.array([1.0]))
    with open(tmp_path / LOG_NAME, "ab") as f:
        f.write(_line({"kind": "chunk", "task": "t", "names": ["b"], "values": {"dtype": "<f8"}}))
        f.write(_line({"kind": "memo", "task": "t", "key": "k", "value": 1}))
    with pytest.raises(CorruptProgressError, match=f"{LOG_NAME}:3: malformed progress record"):
        RunLog.open(tmp_path, {})
