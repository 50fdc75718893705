"""A cross-encoder's relevance logit to its score (a post-processing `answer.py`), as
sentence-transformers' `CrossEncoder.predict` gives it for a one-label head: the sigmoid.

In: `relevance_logits` [batch, 1]. Out: `SCORE` [batch, 1] (FP32). Imports only numpy.
"""

from pathlib import Path

import numpy as np


def make(version_dir: Path, params: dict):
    def answer(tensors: dict) -> dict:
        logits = tensors["relevance_logits"].astype(np.float64)
        return {"SCORE": (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)}

    return answer
