"""The public surface: every module says what it exports, and the top level re-exports it."""

from __future__ import annotations

import importlib
import pkgutil

import jaxpatch

MODULES = sorted(m.name for m in pkgutil.walk_packages(jaxpatch.__path__, "jaxpatch."))


def test_every_module_declares_all_and_every_name_in_it_exists() -> None:
    for name in MODULES:
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} declares no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_the_top_level_exports_every_error_and_resolves_its_names() -> None:
    from jaxpatch import errors

    assert set(errors.__all__) <= set(jaxpatch.__all__)
    assert all(hasattr(jaxpatch, n) for n in jaxpatch.__all__)
    for name in errors.__all__:
        assert issubclass(getattr(jaxpatch, name), jaxpatch.JaxpatchError)


def test_imports_run_one_way() -> None:
    """Low rooms never import high ones (docs/decisions/0009): checked on the source text."""
    order = ["_tree", "errors", "modes", "compile_cache", "rounding", "runs", "mesh", "models", "io",
             "components", "prompts", "metrics", "patch", "stats", "results", "figures", "pair",
             "engine", "attribution", "localization", "learned", "verifiers", "faithfulness", "selection", "hierarchy", "merge", "studies", "cli"]
    rank = {room: i for i, room in enumerate(order)}
    for name in MODULES:
        room = name.split(".")[1]
        if room not in rank:
            continue
        source = importlib.import_module(name).__file__
        assert source is not None
        text = open(source).read()
        for other in order[rank[room] + 1:]:
            assert f"from jaxpatch.{other} " not in text and f"from jaxpatch.{other}." not in text, (
                f"{name} imports jaxpatch.{other}, which sits above it")


def test_the_library_never_imports_experiments() -> None:
    """Pair builders (`experiments/`) use the library and its studies, never the other way."""
    for name in MODULES:
        source = importlib.import_module(name).__file__
        assert source is not None
        text = open(source).read()
        assert "from experiments" not in text and "import experiments" not in text, name
        assert 'files("experiments")' not in text, name

