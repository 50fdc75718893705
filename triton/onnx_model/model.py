"""Triton python-backend model: ONNX Runtime on the CPU, for servers without the
onnxruntime backend (such as the one bundled with nvidia-pytriton).

Imports only numpy, onnxruntime, Triton's own utilities and the shared helpers (runtime.py
next to this file). Its config.pbtxt names the inputs and outputs; parameters: `model_file`
(in the version folder), `intra_op_threads` (0 lets ONNX Runtime choose), and the limits a
request sent straight here is held to (a bad request, not an ONNX Runtime trace):
`vocab_size` (input_ids from 0 to vocab_size - 1; 0 = unchecked) and `max_tokens`
(0 = unchecked). Requests whose inputs have the same shape run in one call.
"""

from collections import defaultdict

import llm_in_triton_runtime as runtime  # the shared helpers, shipped beside this file
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = runtime.model_args(args)
        options = runtime.session_options(params.read("intra_op_threads", int), spinning=1)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(version_dir / params.read("model_file")),
            options,
            providers=["CPUExecutionProvider"],
        )
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.vocab_size = params.read("vocab_size", int)
        self.max_tokens = params.read("max_tokens", int)

    def _problem(self, feed: dict) -> str | None:
        """Why a request's token ids cannot be run, in words, or None."""
        ids = feed.get("input_ids")
        if ids is None or ids.size == 0:
            return None
        if self.max_tokens and ids.ndim > 1 and ids.shape[1] > self.max_tokens:
            return (
                f"input_ids has {ids.shape[1]} tokens; this model takes at most "
                f"{self.max_tokens} tokens (seq=MIN,OPT,MAX): send fewer, or rebuild with a "
                "larger MAX"
            )
        return runtime.outside_vocabulary(ids, self.vocab_size)

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = defaultdict(list)  # input shapes -> [(request index, feed)]
        for index, request in enumerate(requests):
            feed = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    responses[index] = runtime.bad_request(f"missing input '{name}'")
                    break
                feed[name] = tensor.as_numpy()
            else:
                problem = self._problem(feed)
                if problem is not None:
                    responses[index] = runtime.bad_request(problem)
                    continue
                key = tuple(feed[name].shape for name in self.inputs)
                groups[key].append((index, feed))
        for members in groups.values():
            self._run(members, responses)
        return responses

    def _run(self, members, responses):
        feed = {
            name: np.concatenate([f[name] for _, f in members])
            if len(members) > 1
            else members[0][1][name]
            for name in self.inputs
        }
        try:
            results = self.session.run(self.outputs, feed)
        except Exception as err:  # ONNX Runtime raises its own exception types
            for index, _ in members:
                responses[index] = runtime.failed(f"ONNX Runtime failed: {err}")
            return
        start = 0
        for index, member_feed in members:
            rows = len(member_feed[self.inputs[0]])
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + rows]))
                for name, value in zip(self.outputs, results)
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += rows
