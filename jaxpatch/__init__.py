"""jaxpatch: weight patching in JAX.

The public API is what this module exports (every other name may change):

    load, save                       checkpoints in and out (Hugging Face folders, Orbax)
    Model, ModelConfig, forward      models as pure functions over params pytrees
    init_params, param_shapes        random params and the params tree's structure
    flatten_params                   a params tree as dotted names
    components, select, parse        the vocabulary of what is patched, and selectors
    Patch, apply                     patches as coefficient pytrees; the jitted tree-merge
    VectorAnchor, LogitDiff, KLDivergence, LogProb, CustomMetric   behavioral interfaces
    ComponentAnchor                  the vector anchor read at components' outputs
    Prompt, read_prompts, make_batch                                prompts and readout positions
    check_pair, endpoints, endpoint_scores, score_patch             a base/donor pair
    sweep, SweepResult               exact, batched patch sweeps
    attribute, localize              gradient attribution; narrow by attribution, verify exactly
    learn_patch, LearnedPatch        a patch learned with gates and a sparsity penalty (optax)
    activation_patching              the activation patching baseline
    sweep_matrix, activation_matrix  every candidate read at every target (ScoreMatrix)
    plant_patch, planted_labels      planted sets
    roc_auc, roc_curve, spearman     scoring a ranking
    Granularity, Direction, ...      the modes signatures take (`jaxpatch.modes`)
    JaxpatchError and its subclasses every error on bad input

Importing jaxpatch turns JAX's persistent compilation cache on (`jaxpatch.compile_cache`;
JAXPATCH_COMPILE_CACHE=0 turns it off).

Docstring examples use a small random pair: `cfg`, `base`, `donor` and `batch` are
`jaxpatch.examples.example_pair()` (see `jaxpatch.examples`).
"""

from jaxpatch import compile_cache as _compile_cache
from jaxpatch._tree import flatten_params
from jaxpatch.attribution import Localization, alpha_gradients, attribute, localize
from jaxpatch.components import Component, Selector, components, parse, select
from jaxpatch.engine import sweep, sweep_matrix
from jaxpatch.errors import (
                             CheckpointNotFoundError,
                             CorruptCheckpointError,
                             InvalidInputError,
                             JaxpatchError,
                             MetricError,
                             MissingTensorError,
                             NonFiniteError,
                             OutputExistsError,
                             PatchError,
                             PickleCheckpointError,
                             PromptsError,
                             SelectorError,
                             TensorShapeError,
                             UnexpectedTensorError,
                             UnsafePathError,
                             UnsupportedArchitectureError,
                             UnsupportedConfigError,
)
from jaxpatch.io import load, save
from jaxpatch.io.runlog import RunLog
from jaxpatch.learned import LearnedPatch, learn_patch
from jaxpatch.metrics import (
                             ComponentAnchor,
                             CustomMetric,
                             KLDivergence,
                             LogitDiff,
                             LogProb,
                             Metric,
                             VectorAnchor,
                             load_anchor,
                             save_anchor,
)
from jaxpatch.models import (
                             FAMILIES,
                             ForwardOutput,
                             Model,
                             ModelConfig,
                             RopeScaling,
                             count_params,
                             forward,
                             init_params,
                             pad_right,
                             param_shapes,
)
from jaxpatch.modes import (
                             AttributionMethod,
                             Direction,
                             Granularity,
                             PairDirection,
                             Positions,
                             ScoredGranularity,
)
from jaxpatch.pair import check_pair, endpoint_scores, endpoints, score_patch
from jaxpatch.patch import Patch, apply
from jaxpatch.prompts import Batch, Prompt, make_batch, read_prompts
from jaxpatch.results import ScoreMatrix, SweepResult
from jaxpatch.scoring import plant_patch, planted_labels
from jaxpatch.stats import roc_auc, roc_curve, spearman
from jaxpatch.trace import activation_matrix, activation_patching

_compile_cache.from_environment()  # on by default: see jaxpatch.compile_cache

__version__ = "0.1.0"

__all__ = [
    # checkpoints and models
    "load", "save", "Model", "ModelConfig", "RopeScaling", "FAMILIES", "forward", "ForwardOutput",
    "init_params", "param_shapes", "count_params", "flatten_params", "pad_right",
    # what is patched
    "Component", "Selector", "components", "select", "parse", "Patch", "apply",
    # behavior
    "Metric", "VectorAnchor", "ComponentAnchor", "LogitDiff", "KLDivergence", "LogProb",
    "CustomMetric",
    "save_anchor", "load_anchor", "Prompt", "Batch", "read_prompts", "make_batch",
    # scoring
    "check_pair", "endpoints", "endpoint_scores", "score_patch", "sweep", "SweepResult",
    "attribute", "alpha_gradients", "localize", "Localization", "learn_patch", "LearnedPatch",
    "activation_patching", "sweep_matrix", "activation_matrix", "ScoreMatrix",
    "plant_patch", "planted_labels", "roc_auc", "roc_curve", "spearman", "RunLog",
    # modes
    "Granularity", "ScoredGranularity", "Direction", "PairDirection", "AttributionMethod",
    "Positions",
    # errors
    "JaxpatchError", "CheckpointNotFoundError", "CorruptCheckpointError", "InvalidInputError",
    "MetricError", "MissingTensorError", "NonFiniteError", "OutputExistsError", "PatchError",
    "PickleCheckpointError", "PromptsError", "SelectorError", "TensorShapeError",
    "UnexpectedTensorError", "UnsafePathError", "UnsupportedArchitectureError",
    "UnsupportedConfigError",
    "__version__",
]
