"""The serving decoding loop's sampling filters agree with Hugging Face's logits warpers."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.generation_parity import load_decoding


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 0.9), (0.7, 20, 1.0), (1.3, 50, 0.5), (0.5, 5, 0.95), (1.0, 0, 1e-6)],
)
def test_sampling_keeps_the_tokens_hugging_face_keeps(temperature, top_k, top_p):
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    decoding = load_decoding()
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(0, 3, size=300).astype(np.float32)
        params = decoding.RowParams(
            8, sample=True, temperature=temperature, top_k=top_k, top_p=top_p
        )
        ours = np.isfinite(decoding.filtered_scores(logits, params))
        scores = torch.from_numpy(logits)[None].double()
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        theirs = torch.isfinite(scores)[0].numpy()
        assert (ours == theirs).all()
        assert ours.any()  # at least the best token survives


def test_the_same_seed_draws_the_same_tokens():
    decoding = load_decoding()
    logits = np.random.default_rng(1).normal(size=100)
    params = decoding.RowParams(4, sample=True, temperature=1.0, top_k=30, seed=3)
    draw = [decoding.sample_token(logits, params, np.random.default_rng(3)) for _ in range(3)]
    assert len(set(draw)) == 1
