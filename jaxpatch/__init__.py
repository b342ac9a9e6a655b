"""jaxpatch: weight patching in JAX.

Public API (everything else is private and may change):

    load, save                      checkpoints in and out (Hugging Face folders, Orbax)
    Model, ModelConfig, forward     models as pure functions over params pytrees
    init_params, param_shapes       random params and the params tree's structure
    JaxpatchError                   the base class of every error on bad input
"""

from jaxpatch.errors import JaxpatchError
from jaxpatch.io import load, save
from jaxpatch.models import (FAMILIES, ForwardOutput, Model, ModelConfig, RopeScaling,
                             count_params, flatten_params, forward, init_params, pad_right,
                             param_shapes)

__version__ = "0.1.0"

__all__ = ["FAMILIES", "ForwardOutput", "JaxpatchError", "Model", "ModelConfig", "RopeScaling",
           "count_params", "flatten_params", "forward", "init_params", "load", "pad_right",
           "param_shapes", "save", "__version__"]
