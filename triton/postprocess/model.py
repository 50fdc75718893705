"""Triton python-backend model: a task's readable answers from a native model's outputs
(after TensorRT or ONNX Runtime's own backend; on the python backend the pipeline model
answers in the same process).

The task's `answer.py` next to this file does the work (triton/label/, triton/qa_answer/):
its `make(version_dir, params)` (params: runtime.py's `Parameters`) returns a function from
the named input tensors (named as the ensemble names them) to the named outputs. Imports only
numpy, Triton's utilities and the shared helpers (runtime.py, next to this file).
"""

import llm_in_triton_runtime as runtime  # the shared helpers, shipped beside this file
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = runtime.model_args(args)
        self.answer = runtime.load(version_dir, "answer").make(version_dir, params)
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
