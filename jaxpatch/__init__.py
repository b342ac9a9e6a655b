"""jaxpatch: weight patching in JAX.

Public API (everything else is private and may change):

    load, save                      checkpoints in and out (Hugging Face folders, Orbax)
    Model, ModelConfig, forward     models as pure functions over params pytrees
    init_params, param_shapes       random params and the params tree's structure
    components, select, parse       the vocabulary of what is patched, and selectors
    Patch, apply                    patches as coefficient pytrees; the jitted tree-merge
    VectorAnchor, LogitDiff, KLDivergence, LogProb, CustomMetric    behavioral interfaces
    Prompt, read_prompts, make_batch                                 prompts and readout positions
    sweep, SweepResult              exact, batched patch sweeps
    attribute, localize             gradient attribution; narrow by attribution, verify exactly
    activation_patching             the activation patching baseline
    plant_patch, roc_auc            planted sets and scoring a ranking against them
    JaxpatchError                   the base class of every error on bad input
"""

from jaxpatch.attribution import attribute, localize
from jaxpatch.components import Component, components, parse, select
from jaxpatch.engine import SweepResult, sweep
from jaxpatch.errors import JaxpatchError
from jaxpatch.io import load, save
from jaxpatch.metrics import CustomMetric, KLDivergence, LogitDiff, LogProb, VectorAnchor
from jaxpatch.models import (FAMILIES, ForwardOutput, Model, ModelConfig, RopeScaling,
                             count_params, flatten_params, forward, init_params, pad_right,
                             param_shapes)
from jaxpatch.patch import Patch, apply
from jaxpatch.prompts import Prompt, make_batch, read_prompts
from jaxpatch.scoring import plant_patch, roc_auc
from jaxpatch.trace import activation_patching

__version__ = "0.1.0"

__all__ = ["FAMILIES", "Component", "CustomMetric", "ForwardOutput", "JaxpatchError",
           "KLDivergence", "LogProb", "LogitDiff", "Model", "ModelConfig", "Patch", "Prompt",
           "RopeScaling", "SweepResult", "VectorAnchor", "activation_patching", "apply", "attribute",
           "components", "count_params", "flatten_params", "forward", "init_params", "load",
           "localize", "make_batch", "pad_right", "param_shapes", "parse", "plant_patch",
           "read_prompts", "roc_auc", "save", "select", "sweep", "__version__"]
