"""Error types. Every failure jaxpatch reports on purpose is a `JaxpatchError`.

The command line prints the message of a `JaxpatchError` as one line and exits with status 2,
so each message names the file, tensor, shape or selector at fault and, where there is one,
the way out.
"""

from __future__ import annotations

__all__ = ["JaxpatchError", "CheckpointNotFoundError", "UnsupportedArchitectureError",
           "UnsupportedConfigError", "CorruptCheckpointError", "MissingTensorError",
           "UnexpectedTensorError", "TensorShapeError", "UnsafePathError", "PickleCheckpointError",
           "InvalidInputError", "OutputExistsError", "SelectorError", "PatchError", "PromptsError",
           "MetricError", "NonFiniteError", "RunMismatchError", "CorruptProgressError",
           "OutputWriteError"]


class JaxpatchError(Exception):
    """Base class of every error jaxpatch raises on bad input."""


class CheckpointNotFoundError(JaxpatchError):
    """A checkpoint folder, or a file it must hold, does not exist."""


class UnsupportedArchitectureError(JaxpatchError):
    """The checkpoint's architecture is not one jaxpatch implements."""


class UnsupportedConfigError(JaxpatchError):
    """A config setting would change the numerics in a way jaxpatch does not implement."""


class CorruptCheckpointError(JaxpatchError):
    """A checkpoint file is truncated, malformed or inconsistent with its own header."""


class MissingTensorError(JaxpatchError):
    """A tensor the architecture needs is absent from the checkpoint."""


class UnexpectedTensorError(JaxpatchError):
    """The checkpoint holds a tensor the architecture does not use."""


class TensorShapeError(JaxpatchError):
    """A tensor has a different shape than the architecture needs."""


class UnsafePathError(JaxpatchError):
    """A file name inside a checkpoint points outside the checkpoint folder."""


class PickleCheckpointError(JaxpatchError):
    """Only pickle-based weights (pytorch_model.bin) are present; jaxpatch never unpickles."""


class InvalidInputError(JaxpatchError):
    """Model input is invalid: token ids out of range, a sequence too long, a bad shape."""


class OutputExistsError(JaxpatchError):
    """An output path already exists and jaxpatch will not overwrite it."""


class SelectorError(JaxpatchError):
    """A selector does not parse, or matches no component."""


class PatchError(JaxpatchError):
    """A patch does not fit the params it is applied to, or its file is malformed."""


class PromptsError(JaxpatchError):
    """The prompts file is missing, empty or malformed."""


class MetricError(JaxpatchError):
    """A metric cannot be computed: a zero-length anchor, a layer out of range, a bad file."""


class NonFiniteError(JaxpatchError):
    """A weight or a score is NaN or infinite."""


class RunMismatchError(JaxpatchError):
    """The output folder holds the progress of a run with other settings or inputs."""


class CorruptProgressError(JaxpatchError):
    """A progress log is damaged (not at its last line, where a kill can tear a write)."""


class OutputWriteError(JaxpatchError):
    """An output or progress file could not be written (full disk, no permission)."""
