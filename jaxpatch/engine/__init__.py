"""The scoring core: a prepared pair (`prepared`), planning (`plan`), compiled programs
(`programs`), the one chunk runner (`chunks`), and the batched methods built on them: exact
weight sweeps (`sweep`), activation patching (`activation`) and generation under patches
(`generation`). See
docs/decisions/0009-rooms-with-one-job.md and 0019-one-scoring-core.md for the cut."""

from jaxpatch.engine.activation import activation_matrix, activation_patching
from jaxpatch.engine.generation import generate_under_patches, greedy_generate
from jaxpatch.engine.prepared import PreparedPair, prepare
from jaxpatch.engine.sweep import sweep, sweep_matrix

__all__ = ["PreparedPair", "prepare", "sweep", "sweep_matrix", "activation_patching",
           "activation_matrix", "greedy_generate", "generate_under_patches"]
