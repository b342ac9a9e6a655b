"""Live parity with Hugging Face transformers (needs the `reference` extra; skipped without it).

The same comparisons as the golden fixtures, on freshly built random models, and the other
direction: folders written by jaxpatch load in transformers with the same logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch.io.hf import read_config
from jaxpatch.models.families import config_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import make_fixtures  # noqa: E402

pytestmark = [pytest.mark.reference, pytest.mark.slow]


def hf_logits(folder: Path, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.numpy()


@pytest.mark.parametrize("name", [n for n in make_fixtures.VARIANTS if not n.endswith("bf16")])
def test_fresh_random_models_match_transformers(name: str, tmp_path: Path) -> None:
    family, kwargs = make_fixtures.VARIANTS[name]
    make_fixtures.build(name, family, kwargs, tmp_path, seed=1234)
    ref = np.load(tmp_path / f"{name}.npz")
    mask = ref["attention_mask"].astype(bool)
    logits = np.asarray(jaxpatch.load(tmp_path / name)(ref["tokens"], mask))
    assert np.abs(logits - ref["logits"])[mask].max() < 1e-4


@pytest.mark.parametrize("family", jaxpatch.FAMILIES)
def test_folders_written_by_jaxpatch_load_in_transformers(family: str, tmp_path: Path) -> None:
    overrides = {"qwen2": dict(sliding_windows=(None, 3)), "qwen3": dict(sliding_windows=(None, 3)),
                 "phi3": dict(sliding_windows=(3, 3))}.get(family, {})
    config = jaxpatch.ModelConfig.tiny(family, **overrides)
    if family == "llama":
        config = config.replace(rope_scaling=jaxpatch.RopeScaling("llama3", 4.0, 1.0, 4.0, 32))
    model = jaxpatch.Model(config, jaxpatch.init_params(config, jax.random.key(7), scale=0.3))
    jaxpatch.save(model, tmp_path / "ours")
    tokens, mask = make_fixtures.batch(3)
    tokens = np.minimum(tokens, config.vocab_size - 1)
    theirs = hf_logits(tmp_path / "ours", tokens, mask)
    ours = np.asarray(model(tokens, mask.astype(bool)))
    assert np.abs(ours - theirs)[mask.astype(bool)].max() < 1e-4


@pytest.mark.parametrize("family", jaxpatch.FAMILIES)
def test_default_configs_of_the_installed_transformers_are_read(family: str, tmp_path: Path) -> None:
    """The same check as the recorded default_configs.json, on whatever transformers is installed."""
    config = getattr(transformers, make_fixtures.CONFIG_CLASSES[family])()
    config.save_pretrained(tmp_path)
    assert config_from_hf(config.to_dict()).family == family
    assert read_config(tmp_path).family == family
