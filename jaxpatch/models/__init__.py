"""One decoder-only transformer over a params pytree, and the families it covers."""

from jaxpatch.models.config import (
                                    FAMILIES,
                                    ModelConfig,
                                    Params,
                                    RopeScaling,
                                    count_params,
                                    init_params,
                                    param_shapes,
)
from jaxpatch.models.decoder import ForwardOutput, forward
from jaxpatch.models.families import config_from_hf, config_to_hf
from jaxpatch.models.model import Model, check_tokens, pad_right

__all__ = ["FAMILIES", "ModelConfig", "Params", "RopeScaling", "count_params",
           "init_params", "param_shapes", "ForwardOutput", "forward", "config_from_hf",
           "config_to_hf", "Model", "check_tokens", "pad_right"]
