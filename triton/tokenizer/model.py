"""Triton python-backend model: text in, the model's token tensors out.

Runs inside Triton and imports only numpy, `tokenizers` and Triton's own utilities (no
`transformers`, nothing from the build). Everything it needs comes from its config.pbtxt:
the text inputs (two inputs are encoded as a pair), the outputs the model takes, and the
parameters `max_seq` (truncation), `min_seq` (minimum padded length) and `pad_id`.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

# Triton output name -> attribute of a `tokenizers.Encoding`
ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}


def _parameter(config: dict, key: str) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        raise pb_utils.TritonModelException(f"config.pbtxt lacks parameter '{key}'") from None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        self.max_seq = int(_parameter(config, "max_seq"))
        self.min_seq = int(_parameter(config, "min_seq"))
        self.pad_id = int(_parameter(config, "pad_id"))
        self.tokenizer.no_padding()  # padded per request below, to its own longest text
        self.tokenizer.enable_truncation(max_length=self.max_seq)
        self.text_inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = []
        for tensor in config["output"]:
            if tensor["name"] not in ENCODING_FIELDS:
                raise pb_utils.TritonModelException(
                    f"output '{tensor['name']}' is not one of {sorted(ENCODING_FIELDS)}"
                )
            dtype = pb_utils.triton_string_to_numpy(tensor["data_type"])
            self.outputs.append((tensor["name"], ENCODING_FIELDS[tensor["name"]], dtype))

    def _texts(self, request) -> list:
        """One list of str per text input, each with one entry per batch item."""
        columns = []
        for name in self.text_inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input '{name}'")
            values = tensor.as_numpy().reshape(-1)
            columns.append(
                [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
            )
        if len({len(c) for c in columns}) > 1:
            raise ValueError(f"inputs {self.text_inputs} must have the same batch size")
        return columns

    def execute(self, requests):
        responses = [None] * len(requests)
        batches = []  # (request index, texts) for the requests that are well formed
        for index, request in enumerate(requests):
            try:
                batches.append((index, self._texts(request)))
            except ValueError as err:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
        items = []
        for _, columns in batches:
            items.extend(zip(*columns) if len(columns) > 1 else columns[0])
        encodings = self.tokenizer.encode_batch(items) if items else []  # one call for all
        start = 0
        for index, columns in batches:
            count = len(columns[0])
            responses[index] = self._response(encodings[start : start + count])
            start += count
        return responses

    def _response(self, encodings):
        length = max([self.min_seq, *(len(e.ids) for e in encodings)])
        tensors = []
        for name, field, dtype in self.outputs:
            pad = self.pad_id if field == "ids" else 0
            array = np.full((len(encodings), length), pad, dtype=dtype)
            for row, encoding in enumerate(encodings):
                values = getattr(encoding, field)
                array[row, : len(values)] = values
            tensors.append(pb_utils.Tensor(name, array))
        return pb_utils.InferenceResponse(output_tensors=tensors)
