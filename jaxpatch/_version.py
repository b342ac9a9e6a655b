"""The version of jaxpatch (one place: the package's `__version__` and the run records read it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
