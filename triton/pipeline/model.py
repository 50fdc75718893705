"""Triton python-backend model: text in, the task's answers out, in one process (one hop).

On the python backend the model step is a python model anyway, so tokenizing, inference
(ONNX Runtime) and the task's answer step (`answer.py`, seqcls and qa) run here together,
and `<name>` (the ensemble) has this one step: no tensor crosses between processes but the
texts in and the answers out.

Requests that arrive together run as padded batches although their lengths differ: each
request is tokenized as it would be alone (`encoding.py`; its own padded length), requests of
similar lengths are grouped (sorted by length; a group grows while its padded tokens stay
within `batch_waste` times its real ones) and each group runs as one ONNX Runtime call, its
inputs padded to the group's longest. Each request's outputs are then cut back to its own
length, so a text's answer does not depend on the company it keeps (to fp32 rounding), and
HIDDEN_STATE has the request's own length, as alone.

Files next to this file: model.onnx, tokenizer.json, encoding.py, and for tasks with an
answer step answer.py (+ the checkpoint files it reads). Parameters: the tokenizer's (see
encoding.py), `model_file`, `intra_op_threads`, `spinning`, `batch_waste`, `model_outputs`
(ONNX output -> ensemble tensor), `sequence_outputs` (ONNX outputs whose second dim is the
sequence), `token_tensors` (the tokenizer's tensors the answer step reads: windows, token ids,
`seq_length`).
Imports only numpy, onnxruntime, tokenizers, Triton's utilities and the shared helpers
(runtime.py, next to this file).
"""

import json
from pathlib import Path

import llm_in_triton_runtime as runtime  # the shared helpers, shipped beside this file
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent

encoding = runtime.load(HERE, "encoding")


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = runtime.model_args(args)
        self.text_inputs = [tensor["name"] for tensor in config["input"]]
        self.max_rows = int(config["max_batch_size"])
        self.encoder = encoding.TextEncoder(
            str(version_dir / "tokenizer.json"), params, self.text_inputs, self.max_rows
        )
        options = runtime.session_options(
            params.read("intra_op_threads", int), params.read("spinning")
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model_file = str(version_dir / params.read("model_file"))
        self.session = ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
        self.feeds = [(i.name, encoding.numpy_type(i.type)) for i in self.session.get_inputs()]
        self.token_tensors = [(name, np.int64) for name in params.read("token_tensors", json.loads)]
        self.model_outputs = dict(params.read("model_outputs", json.loads))  # onnx -> ensemble
        self.sequence_outputs = set(params.read("sequence_outputs", json.loads))
        self.waste = params.read("batch_waste", float)
        self.answer = None
        if (version_dir / "answer.py").is_file():
            self.answer = runtime.load(version_dir, "answer").make(version_dir, params)
        self.outputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]
        ]

    def _columns(self, request) -> list:
        columns = []
        for name in self.text_inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise encoding.RequestError(f"missing input '{name}'")
            columns.append(tensor.as_numpy().reshape(-1))
        return columns

    def execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (request index, its text columns, its Encoded)
        items = []
        for index, request in enumerate(requests):
            try:
                columns = self._columns(request)
                limit = self.encoder.max_text_bytes
                texts = [encoding.texts_of(c, n, limit) for c, n in zip(columns, self.text_inputs)]
                items.append(self.encoder.items(texts))
                good.append((index, columns))
            except encoding.RequestError as err:  # a bad request: its own error
                responses[index] = runtime.bad_request(str(err))
        ready = []
        for (index, columns), encoded in zip(good, self.encoder.encode(items)):
            if isinstance(encoded, encoding.RequestError):
                responses[index] = runtime.bad_request(str(encoded))
            else:
                ready.append((index, columns, encoded))
        lengths = [encoded.length for _, _, encoded in ready]
        rows = [len(encoded.rows) for _, _, encoded in ready]
        for group in encoding.length_groups(lengths, rows, self.waste, self.max_rows):
            self._run([ready[i] for i in group], responses)
        return responses

    def _run(self, members, responses):
        """One ONNX Runtime call for requests padded to the longest of them."""
        longest = max(encoded.length for _, _, encoded in members)
        try:
            feeds = [self.encoder.arrays(e, self.feeds, longest) for _, _, e in members]
            feed = {name: np.concatenate([f[name] for f in feeds]) for name, _ in self.feeds}
            results = dict(
                zip(self.model_outputs, self.session.run(list(self.model_outputs), feed))
            )
        except Exception as err:  # ONNX Runtime raises its own exception types
            for index, _, _ in members:
                responses[index] = runtime.failed(f"ONNX Runtime failed: {err}")
            return
        start = 0
        for index, columns, encoded in members:
            stop = start + len(encoded.rows)
            try:
                responses[index] = self._answer(columns, encoded, results, start, stop)
            except Exception as err:  # this request's error; the others of the call go on
                responses[index] = runtime.failed(f"answering failed: {type(err).__name__}: {err}")
            start = stop

    def _answer(self, columns, encoded, results: dict, start: int, stop: int):
        """One request's response from its rows of the call's outputs."""
        tensors = dict(zip(self.text_inputs, (c.reshape(-1, 1) for c in columns)))
        tensors.update(self.encoder.arrays(encoded, self.token_tensors))
        for onnx_name, value in results.items():
            mine = value[start:stop]
            if onnx_name in self.sequence_outputs:
                mine = mine[:, : encoded.length]
            tensors[self.model_outputs[onnx_name]] = mine
        if self.answer is not None:
            tensors.update(self.answer(tensors))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(tensors[name], dtype=dtype))
                for name, dtype in self.outputs
            ]
        )
