"""Triton python-backend model: text in, the model's token tensors out, before a model on a
native backend (TensorRT, ONNX Runtime's own backend) or a generation loop.

Runs inside Triton and imports only numpy, `tokenizers`, Triton's own utilities and the shared
helpers (runtime.py; no `transformers`, nothing from the build). The tokenizing is
`encoding.py` next to this file (see there for the parameters); the config names the text
inputs and the outputs.

The requests of one call that have similar lengths (`length_groups`: padded tokens within
`batch_waste` times the real ones) are padded to the longest of them, so they leave with
equal shapes and the model's dynamic batcher runs them as one batch, on any backend. The
`seq_length` output carries each request's own length, to which the answer step cuts the
model's sequence outputs back.
"""

from pathlib import Path

import llm_in_triton_runtime as runtime  # the shared helpers, shipped beside this file
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent

encoding = runtime.load(HERE, "encoding")


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = runtime.model_args(args)
        text_inputs = [tensor["name"] for tensor in config["input"]]
        self.max_rows = int(config["max_batch_size"])
        self.encoder = encoding.TextEncoder(
            str(version_dir / "tokenizer.json"), params, text_inputs, self.max_rows
        )
        self.outputs = []
        self.waste = params.read("batch_waste", float)
        known = [*encoding.ENCODING_FIELDS, *encoding.WINDOW_FIELDS, encoding.LENGTH_FIELD]
        for tensor in config["output"]:
            if tensor["name"] not in known:
                raise pb_utils.TritonModelException(
                    f"output '{tensor['name']}' is not one of {known}"
                )
            dtype = pb_utils.triton_string_to_numpy(tensor["data_type"])
            self.outputs.append((tensor["name"], dtype))

    def _items(self, request) -> list:
        columns = []
        for name in self.encoder.text_inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise encoding.RequestError(f"missing input '{name}'")
            values = tensor.as_numpy().reshape(-1)
            columns.append(encoding.texts_of(values, name, self.encoder.max_text_bytes))
        return self.encoder.items(columns)

    def execute(self, requests):
        responses = [None] * len(requests)
        good = []
        for index, request in enumerate(requests):
            try:
                good.append((index, self._items(request)))
            except encoding.RequestError as err:  # a bad request: its own error
                responses[index] = runtime.bad_request(str(err))
        ready = []
        for (index, _), encoded in zip(good, self.encoder.encode([i for _, i in good])):
            if isinstance(encoded, encoding.RequestError):
                responses[index] = runtime.bad_request(str(encoded))
            else:
                ready.append((index, encoded))
        lengths = [encoded.length for _, encoded in ready]
        rows = [len(encoded.rows) for _, encoded in ready]
        for group in encoding.length_groups(lengths, rows, self.waste, self.max_rows):
            longest = max(lengths[i] for i in group)
            for index, encoded in (ready[i] for i in group):
                arrays = self.encoder.arrays(encoded, self.outputs, longest)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, a) for n, a in arrays.items()]
                )
        return responses
