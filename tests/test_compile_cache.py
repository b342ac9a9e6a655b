"""The persistent compilation cache: a second process reads what the first compiled."""

from __future__ import annotations

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
pair = example_pair()
jaxpatch.sweep(pair.base, pair.donor, pair.batch, jaxpatch.KLDivergence(), progress=False)
print(len(hits))
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


def test_the_default_folder_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_cache_dir() == tmp_path / "jaxpatch" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_cache_dir() == Path.home() / ".cache" / "jaxpatch" / "xla"
