"""Triton python-backend model: classification logits to a label people can read.

Input `LOGITS` [batch, labels]; outputs `LABEL` (the label name, from `id2label` in the
checkpoint's config.json next to this file) and `SCORE` (its softmax probability).
Imports only numpy and Triton's own utilities.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = json.loads((version_dir / "config.json").read_text())
        id2label = config.get("id2label") or {}
        self.labels = {int(index): str(label) for index, label in id2label.items()}

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "LOGITS").as_numpy()
            logits = logits.astype(np.float64)
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
            best = probabilities.argmax(axis=-1)
            labels = np.array(
                [[self.labels.get(int(i), f"LABEL_{int(i)}").encode("utf-8")] for i in best],
                dtype=object,
            )
            scores = probabilities[np.arange(len(best)), best].astype(np.float32)[:, None]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("LABEL", labels),
                        pb_utils.Tensor("SCORE", scores),
                    ]
                )
            )
        return responses
