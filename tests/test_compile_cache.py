"""The persistent compilation cache: a second process reads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpatch import compile_cache

SCRIPT = """
import jax.monitoring
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
import jaxpatch
from jaxpatch.examples import example_pair
jaxpatch.compile_cache.from_environment()  # what the jaxpatch command does
pair = example_pair()
jaxpatch.sweep(jaxpatch.prepare(pair.base, pair.donor, pair.batch), jaxpatch.KLDivergence(),
               execution=jaxpatch.Execution(progress=False))
print(len(hits))
"""

UNTOUCHED = """
import json, jax
names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
         "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
before = {n: getattr(jax.config, n) for n in names}
import jaxpatch
after = {n: getattr(jax.config, n) for n in names}
print(json.dumps([before, after]))
"""


def run(env: dict[str, str]) -> int:
    """Cache hits of one fresh process running a small sweep."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent.parent)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_reads_the_programs_the_first_compiled(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, compile_cache.ENVIRONMENT_VARIABLE: str(cache)}
    assert run(env) == 0
    written = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert written  # the first process wrote its programs
    assert run(env) >= 3  # the second read them back
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == written  # nothing new
    off = tmp_path / "off"
    assert run({**env, compile_cache.ENVIRONMENT_VARIABLE: "0", "XDG_CACHE_HOME": str(off)}) == 0
    assert not off.exists()


def test_importing_jaxpatch_leaves_the_jax_configuration_as_it_was(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENVIRONMENT_VARIABLE}
    done = subprocess.run([sys.executable, "-c", UNTOUCHED], env={**env, "XDG_CACHE_HOME": str(tmp_path)},
                          capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent)
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == after
    assert not (tmp_path / "jaxpatch").exists()


def test_the_command_turns_the_cache_on_unless_told_not_to(tmp_path: Path) -> None:
    script = ("import jax, sys; from jaxpatch.cli import main; main(['info', sys.argv[1]]); "
              "print(jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)")
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENVIRONMENT_VARIABLE}
    fixture = str(Path(__file__).parent / "fixtures" / "gpt2")
    on = subprocess.run([sys.executable, "-c", script, fixture], capture_output=True, text=True,
                        check=True, env={**env, "XDG_CACHE_HOME": str(tmp_path)})
    assert on.stdout.strip().splitlines()[-1] == f"True {tmp_path / 'jaxpatch' / 'xla'}"
    off = subprocess.run([sys.executable, "-c", script, fixture], capture_output=True, text=True,
                         check=True, env={**env, compile_cache.ENVIRONMENT_VARIABLE: "0"})
    assert off.stdout.strip().splitlines()[-1].startswith("False")


def test_the_default_folder_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_cache_dir() == tmp_path / "jaxpatch" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_cache_dir() == Path.home() / ".cache" / "jaxpatch" / "xla"
