"""Metrics and prompts: definitions checked by hand, files, and bad input."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import (
    KLDivergence,
    LogitDiff,
    LogProb,
    MetricError,
    Prompt,
    PromptsError,
    VectorAnchor,
    load_anchor,
    make_batch,
    read_prompts,
    save_anchor,
)
from jaxpatch.metrics import readout

CONFIG = jaxpatch.ModelConfig.tiny("llama")
BASE = jaxpatch.init_params(CONFIG, jax.random.key(0), scale=0.2)
DONOR = jaxpatch.init_params(CONFIG, jax.random.key(1), scale=0.2)
PROMPTS = [Prompt((1, 2, 3, 4), (9, 10), (8,)), Prompt((7, 8), (3, 4), (4,))]


def full_logits(params: dict, tokens: list[int]) -> np.ndarray:
    return np.asarray(jaxpatch.forward(CONFIG, params, jnp.array([tokens])).logits[0])


@pytest.mark.slow
def test_vector_anchor_matches_its_definition() -> None:
    batch = make_batch(CONFIG, PROMPTS, "prompt")
    metric = VectorAnchor(layer=0)
    direction = np.asarray(metric.prepare(CONFIG, BASE, DONOR, batch))

    def residual(params: dict, tokens: tuple[int, ...]) -> np.ndarray:
        out = jaxpatch.forward(CONFIG, params, jnp.array([tokens]), stop_layer=0)
        return np.asarray(out.residual[0]).mean(0)  # mean over the prompt's positions

    v = np.mean([residual(DONOR, p.tokens) - residual(BASE, p.tokens) for p in PROMPTS], axis=0)
    np.testing.assert_allclose(direction, v / np.linalg.norm(v), atol=1e-5)
    score = float(metric.score(readout(CONFIG, BASE, batch, 0), batch, direction).mean())
    expected = np.mean([residual(BASE, p.tokens) @ (v / np.linalg.norm(v)) for p in PROMPTS])
    np.testing.assert_allclose(score, expected, rtol=1e-5)


@pytest.mark.slow
def test_logit_metrics_match_their_definitions() -> None:
    last = make_batch(CONFIG, PROMPTS)
    x = readout(CONFIG, BASE, last, None)
    diffs = LogitDiff().score(x, last, ())
    for i, p in enumerate(PROMPTS):
        logits = full_logits(BASE, list(p.tokens))[-1]
        np.testing.assert_allclose(diffs[i], logits[p.target[0]] - logits[p.foil[0]], rtol=1e-5)
    kl = KLDivergence()
    state = kl.prepare(CONFIG, BASE, DONOR, last)
    assert float(jnp.abs(kl.score(readout(CONFIG, DONOR, last, None), last, state)).max()) < 1e-6
    assert float(kl.score(x, last, state).min()) > 0
    targets = make_batch(CONFIG, PROMPTS, "targets")
    logprob = LogProb().score(readout(CONFIG, BASE, targets, None), targets, ())
    for i, p in enumerate(PROMPTS):
        logits = full_logits(BASE, list(p.tokens + (p.target or ())))
        logp = jax.nn.log_softmax(logits, -1)
        n = len(p.tokens)
        expected = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(p.target))
        np.testing.assert_allclose(logprob[i], expected, rtol=1e-5)


def test_anchor_file_round_trip_and_checks(tmp_path: Path) -> None:
    batch = make_batch(CONFIG, PROMPTS)
    direction = VectorAnchor(layer=1).prepare(CONFIG, BASE, DONOR, batch)
    save_anchor(tmp_path / "a.npz", direction, 1)
    loaded = VectorAnchor(layer=1, path=str(tmp_path / "a.npz")).prepare(CONFIG, BASE, BASE, batch)
    np.testing.assert_allclose(loaded, direction, atol=1e-7)
    with pytest.raises(MetricError, match="fitted at layer 1, not 0"):
        load_anchor(tmp_path / "a.npz", CONFIG, 0)
    with pytest.raises(MetricError, match="needs \\(16,\\)"):
        load_anchor(tmp_path / "a.npz", CONFIG.replace(d_model=16), 1)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(MetricError, match="not an anchor file"):
        load_anchor(tmp_path / "bad.npz", CONFIG, 1)


@pytest.mark.parametrize("content, message", [
    ("", "no prompts \\(the file is empty\\)"),
    ('{"tokens": [1, 2]}\n{"tokens": [1, 2]\n', ":2: not valid JSON"),
    ('{"tokens": [1, 2]}\n\n["a"]\n', ":3: expected a JSON object"),
    ('{"prompt": "x"}\n', ":1: needs 'text', 'tokens', 'messages' or 'instruction'"),
    ('{"tokens": []}\n', ":1: 'tokens' must be a non-empty list of token ids"),
    ('{"tokens": [1, "2"]}\n', ":1: 'tokens' must be a non-empty list of token ids"),
    ('{"text": "hello"}\n', ":1: 'text' needs a tokenizer"),
])
def test_prompts_file_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(PromptsError, match=message):
        read_prompts(path)


def test_prompts_with_text_are_tokenized(tmp_path: Path) -> None:
    model = jaxpatch.load(Path(__file__).parent / "fixtures" / "llama-gqa")
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "the lazy fox", "target": " dog", "foil": " cat"}\n')
    [prompt] = read_prompts(path, model.tokenizer)
    assert list(prompt.tokens) == model.tokenizer.encode("the lazy fox").ids
    assert prompt.target and prompt.foil


def test_out_of_range_tokens_are_refused() -> None:
    with pytest.raises(jaxpatch.InvalidInputError, match="token id 500"):
        make_batch(CONFIG, [Prompt((1, 500))])
    with pytest.raises(PromptsError, match="target token id is out of range"):
        make_batch(CONFIG, [Prompt((1, 2), (999,))])
