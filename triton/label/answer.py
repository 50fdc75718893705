"""Classification logits to a label people can read (a post-processing `answer.py`).

In: `LOGITS` [batch, labels]. Out: `LABEL` (the label's name, from `id2label` in the
checkpoint's config.json next to this file) and `SCORE` (its softmax probability).
Imports only numpy and the shared helpers (runtime.py, loaded before this file).
"""

import json
from pathlib import Path

import numpy as np
from llm_in_triton_runtime import softmax


def make(version_dir: Path, params):
    config = json.loads((version_dir / "config.json").read_text())
    labels = {int(i): str(label) for i, label in (config.get("id2label") or {}).items()}

    def answer(tensors: dict) -> dict:
        probabilities = softmax(tensors["LOGITS"])
        best = probabilities.argmax(axis=-1)
        names = [[labels.get(int(i), f"LABEL_{int(i)}").encode("utf-8")] for i in best]
        return {
            "LABEL": np.array(names, dtype=object),
            "SCORE": probabilities[np.arange(len(best)), best].astype(np.float32)[:, None],
        }

    return answer
