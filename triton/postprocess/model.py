"""Triton python-backend model: a task's readable answers from a native model's outputs
(after TensorRT or ONNX Runtime's own backend; on the python backend the pipeline model
answers in the same process).

The task's `answer.py` next to this file does the work (triton/label/, triton/qa_answer/):
its `make(version_dir, parameters)` returns a function from the named input tensors (named
as the ensemble names them) to the named outputs. Imports only numpy and Triton's utilities.
"""

import importlib.util
import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"llm_in_triton_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.answer = _load("answer").make(version_dir, params)
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.inputs
            }
            answers = self.answer(tensors)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, answers[n]) for n in self.outputs]
                )
            )
        return responses
