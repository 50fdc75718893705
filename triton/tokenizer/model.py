"""Triton python-backend model: text in, the model's token tensors out.

Runs inside Triton and imports only numpy, `tokenizers` and Triton's own utilities (no
`transformers`, nothing from the build). Everything it needs comes from its config.pbtxt:
the text inputs (two inputs are encoded as a pair), the outputs the model takes, and the
parameters `max_seq` (truncation), `min_seq` (minimum padded length), `pad_id`, `stride` and
`pad_multiple` (lengths padded up to a multiple, so requests share shapes and batch) and
`overflow` (`truncate` at `max_seq`, or `reject`: a generation prompt is never cut silently).

With `stride` > 0 a long second text (a QA context) is not cut: it is read in overlapping
windows of `max_seq` tokens, one output row per window, and the extra outputs `offsets`
(character span in the second text of each of its tokens, -1 elsewhere) and `window_item`
(the batch item of each row) let a later step map answers back to text.
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
WINDOW_FIELDS = ("offsets", "window_item")


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
        self.measure = Tokenizer.from_file(str(version_dir / "tokenizer.json"))  # no truncation
        self.measure.no_truncation()
        self.measure.no_padding()
        self.max_seq = int(_parameter(config, "max_seq"))
        self.min_seq = int(_parameter(config, "min_seq"))
        self.pad_id = int(_parameter(config, "pad_id"))
        self.stride = int(_parameter(config, "stride"))
        self.pad_multiple = int(_parameter(config, "pad_multiple"))
        self.max_rows = int(config["max_batch_size"])
        self.reject_long = _parameter(config, "overflow") == "reject"  # prompts: never cut
        self.tokenizer.no_padding()  # padded per request below, to its own longest text
        if self.reject_long:
            self.tokenizer.no_truncation()
        elif self.stride:
            self.tokenizer.enable_truncation(
                max_length=self.max_seq, stride=self.stride, strategy="only_second"
            )
        else:
            self.tokenizer.enable_truncation(max_length=self.max_seq)
        self.text_inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = []
        for tensor in config["output"]:
            name = tensor["name"]
            if name not in ENCODING_FIELDS and name not in WINDOW_FIELDS:
                raise pb_utils.TritonModelException(
                    f"output '{name}' is not one of {sorted(ENCODING_FIELDS) + list(WINDOW_FIELDS)}"
                )
            self.outputs.append((name, pb_utils.triton_string_to_numpy(tensor["data_type"])))

    def _texts(self, request) -> list:
        """The request's batch items: str, or (str, str) pairs for two inputs."""
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
        if len(columns) == 1:
            return columns[0]
        if self.stride:  # windows need room for the context beyond the overlap
            room = self.max_seq - self.tokenizer.num_special_tokens_to_add(True) - 2 * self.stride
            for first in columns[0]:
                length = len(self.measure.encode(first, add_special_tokens=False).ids)
                if length > room:
                    raise ValueError(
                        f"{self.text_inputs[0]} has {length} tokens; with windows of "
                        f"{self.max_seq} tokens overlapping by {self.stride} it may have at "
                        f"most {room}: shorten it, or build with a larger max seq"
                    )
        return list(zip(*columns))

    def execute(self, requests):
        responses = [None] * len(requests)
        batches = []  # (request index, items) for the requests that are well formed
        for index, request in enumerate(requests):
            try:
                batches.append((index, self._texts(request)))
            except Exception as err:  # a bad request: its own error, the others go on
                responses[index] = _error(str(err))
        try:  # one call for every text of every request
            encoded = self.tokenizer.encode_batch([i for _, items in batches for i in items])
        except BaseException:  # tokenizers panics are BaseExceptions: find the bad request
            encoded = None
        start = 0
        for index, items in batches:
            if encoded is not None:
                encodings = encoded[start : start + len(items)]
                start += len(items)
            else:
                try:
                    encodings = self.tokenizer.encode_batch(items)
                except BaseException as err:
                    responses[index] = _error(f"cannot tokenize this request: {err}")
                    continue
            responses[index] = self._response(encodings)
        return responses

    def _rows(self, encodings):
        """(encoding, batch item) per output row: one per text, or one per window."""
        for item, encoding in enumerate(encodings):
            yield encoding, item
            if self.stride:
                for window in encoding.overflowing:
                    yield window, item

    def _response(self, encodings):
        rows = list(self._rows(encodings))
        longest = max(len(e.ids) for e, _ in rows)
        if self.reject_long and longest > self.max_seq:
            return _error(
                f"a {self.text_inputs[0]} has {longest} tokens; this deployment takes at most "
                f"{self.max_seq} (seq=MIN,OPT,MAX): shorten it, or rebuild with a larger MAX"
            )
        if len(rows) > self.max_rows:
            return _error(
                f"the texts of this request need {len(rows)} windows of {self.max_seq} tokens; "
                f"at most {self.max_rows} fit in one request: send fewer or shorter texts"
            )
        rounded = -(-longest // self.pad_multiple) * self.pad_multiple  # up to a multiple
        length = max(self.min_seq, min(rounded, max(self.max_seq, longest)))
        tensors = []
        for name, dtype in self.outputs:
            if name == "window_item":
                array = np.array([[item] for _, item in rows], dtype=dtype)
            elif name == "offsets":
                array = np.full((len(rows), length, 2), -1, dtype=dtype)
                for row, (encoding, _) in enumerate(rows):
                    for position, (sequence, span) in enumerate(
                        zip(encoding.sequence_ids, encoding.offsets)
                    ):
                        if sequence == 1:
                            array[row, position] = span
            else:
                field = ENCODING_FIELDS[name]
                array = np.full((len(rows), length), self.pad_id if field == "ids" else 0, dtype)
                for row, (encoding, _) in enumerate(rows):
                    values = getattr(encoding, field)
                    array[row, : len(values)] = values
            tensors.append(pb_utils.Tensor(name, array))
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(message: str):
    """A bad request (HTTP 400), not a server failure."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = (
        pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    )
    return pb_utils.InferenceResponse(error=error)
