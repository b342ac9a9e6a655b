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
    check_pair, endpoints, endpoint_scores, score_patch, delta_norms  a base/donor pair
    prepare, PreparedPair            a pair checked and placed once: what every method runs on
    Execution                        how a method runs: chunks, memory, progress, resumable log
    sweep, SweepResult               exact, batched patch sweeps
    attribute, localize, Verification  gradient attribution; narrow by attribution, verify exactly
    learn_patch, LearnedPatch, GateTraining  a patch learned with gates and a sparsity penalty
    activation_patching              the activation patching baseline
    sweep_matrix, activation_matrix  every candidate read at every target (ScoreMatrix)
    trace_hierarchy, Hierarchy, Thresholds, TraceSearch   sources, aggregation, execution
    faithfulness_curves, ranking, set_points  f(k), CPR and CMD of rankings or sets
    greedy_forward, backward_elimination      set-level selection by exact patching
    greedy_generate, generate_under_patches   generation with a key/value cache, under patches
    TextJudge (jaxpatch.verifiers)   behavior judged on generated text (IFEval-style verifiers)
    RunLog, make_mesh                resumable runs; device meshes
    plant_patch, planted_labels      planted sets
    roc_auc, roc_curve, spearman     scoring a ranking
    Granularity, Direction, ...      the modes signatures take (`jaxpatch.modes`)
    JaxpatchError and its subclasses every error on bad input

Importing jaxpatch changes nothing global. `enable_compile_cache()` turns JAX's persistent
compilation cache on (the `jaxpatch` command does, unless JAXPATCH_COMPILE_CACHE=0; see
`jaxpatch.compile_cache`).

Docstring examples use a small random pair: `cfg`, `base`, `donor` and `batch` are
`jaxpatch.examples.example_pair()` (see `jaxpatch.examples`).
"""

from jaxpatch._tree import flatten_params
from jaxpatch._version import __version__
from jaxpatch.attribution import alpha_gradients, attribute
from jaxpatch.compile_cache import enable as enable_compile_cache
from jaxpatch.components import Component, Selector, components, parse, select
from jaxpatch.engine import (
                             PreparedPair,
                             activation_matrix,
                             activation_patching,
                             generate_under_patches,
                             greedy_generate,
                             prepare,
                             sweep,
                             sweep_matrix,
)
from jaxpatch.errors import (
                             CheckpointNotFoundError,
                             CorruptCheckpointError,
                             CorruptProgressError,
                             InvalidInputError,
                             JaxpatchError,
                             MetricError,
                             MissingTensorError,
                             NonFiniteError,
                             OutputExistsError,
                             OutputWriteError,
                             PatchError,
                             PickleCheckpointError,
                             PromptsError,
                             RunMismatchError,
                             SelectorError,
                             TensorShapeError,
                             UnexpectedTensorError,
                             UnsafePathError,
                             UnsupportedArchitectureError,
                             UnsupportedConfigError,
)
from jaxpatch.faithfulness import (
                             FaithfulnessCurve,
                             faithfulness_curve,
                             faithfulness_curves,
                             ranking,
                             set_points,
)
from jaxpatch.hierarchy import Behavior, Hierarchy, Thresholds, TraceSearch, trace_hierarchy
from jaxpatch.io import load, save
from jaxpatch.learned import GateTraining, LearnedPatch, learn_patch
from jaxpatch.localization import Localization, Verification, localize
from jaxpatch.mesh import make_mesh
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
from jaxpatch.pair import check_pair, delta_norms, endpoint_scores, endpoints, score_patch
from jaxpatch.patch import Patch, apply
from jaxpatch.prompts import Batch, Prompt, make_batch, read_prompts
from jaxpatch.results import ScoreMatrix, SweepResult
from jaxpatch.runs.log import RunLog, TaskLog
from jaxpatch.runs.settings import Execution
from jaxpatch.selection import Selection, backward_elimination, greedy_forward
from jaxpatch.stats import roc_auc, roc_curve, spearman
from jaxpatch.studies.scoring import plant_patch, planted_labels
from jaxpatch.verifiers import TextJudge

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
    "check_pair", "endpoints", "endpoint_scores", "score_patch", "delta_norms", "prepare",
    "PreparedPair",
    "sweep", "SweepResult", "attribute", "alpha_gradients", "localize", "Verification",
    "Localization", "learn_patch", "LearnedPatch", "GateTraining", "activation_patching",
    "sweep_matrix", "activation_matrix", "ScoreMatrix", "trace_hierarchy", "Hierarchy",
    "Thresholds", "TraceSearch", "Behavior", "faithfulness_curve", "faithfulness_curves",
    "FaithfulnessCurve", "ranking", "set_points", "greedy_forward", "backward_elimination",
    "Selection", "greedy_generate",
    "generate_under_patches", "TextJudge",
    "plant_patch", "planted_labels", "roc_auc", "roc_curve", "spearman",
    # how it runs
    "Execution", "RunLog", "TaskLog", "make_mesh", "enable_compile_cache",
    # modes
    "Granularity", "ScoredGranularity", "Direction", "PairDirection", "AttributionMethod",
    "Positions",
    # errors
    "JaxpatchError", "CheckpointNotFoundError", "CorruptCheckpointError", "InvalidInputError",
    "MetricError", "MissingTensorError", "NonFiniteError", "OutputExistsError", "PatchError",
    "PickleCheckpointError", "PromptsError", "SelectorError", "TensorShapeError",
    "UnexpectedTensorError", "UnsafePathError", "UnsupportedArchitectureError",
    "UnsupportedConfigError", "RunMismatchError", "CorruptProgressError", "OutputWriteError",
    "__version__",
]
