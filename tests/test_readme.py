"""Every Python block of the README runs as written, in order, in one namespace (the way a reader
pastes them into one session), from a scratch folder where `tests/fixtures` is the repository's."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks() -> list[tuple[int, str]]:
    """The README's Python blocks with the line each starts on."""
    text = (ROOT / "README.md").read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_the_readme_has_python_blocks() -> None:
    assert len(readme_blocks()) >= 8


@pytest.mark.slow
def test_every_readme_block_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for line, code in readme_blocks():
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README.md block at line {line} fails: "
                                 f"{type(e).__name__}: {e}") from e
    assert os.path.isdir(tmp_path / "out" / "copy")
