"""Model merging: mergekit's standard data-free merges, from mergekit's YAML (`config`), one
tensor at a time (`methods`, `run`).

    config = read_config("merge.yml")
    merged = merge_models(config)
    jaxpatch.save(merged, "out/merged")
"""

from jaxpatch.merge.config import MERGE_METHODS, MergeConfig, read_config
from jaxpatch.merge.run import merge_models

__all__ = ["MERGE_METHODS", "MergeConfig", "read_config", "merge_models"]
