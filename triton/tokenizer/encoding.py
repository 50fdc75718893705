"""Texts to the token tensors a transformer takes: the tokenizing that both the tokenizer
model (triton/tokenizer/model.py, before a native model) and the one-hop pipeline model
(triton/pipeline/model.py, on the python backend) run, so both answer alike.

Imports only numpy and `tokenizers`. Parameters (from config.pbtxt): `max_seq` (truncation),
`min_seq` (minimum padded length), `pad_id`, `stride`, `truncation` (of a pair:
`longest_first`, or `only_second`), `pad_multiple` (lengths padded up to a multiple),
`max_text_bytes` (a longer text is refused, as are empty and non-UTF-8 ones) and `overflow`
(`truncate` at `max_seq`, or `reject`: a generation prompt is never cut silently). Two text
inputs are encoded as a pair. With `stride` > 0 a long last text (a QA context, the one text
of token classification) is not cut: it is read in overlapping windows of `max_seq` tokens,
one row per window, with `offsets` (character span in the last text of each of its tokens,
-1 elsewhere: special tokens, padding, an earlier text) and
`window_item` (the batch item of each row) to map answers back to text.
Requests that arrive together are padded to a shared length (`length_groups`, bounded by
`batch_waste`), and `seq_length` tells the answer step each one's own length.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

# output name -> attribute of a `tokenizers.Encoding`
ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}
WINDOW_FIELDS = ("offsets", "window_item")
LENGTH_FIELD = "seq_length"  # each row's request's own padded length (see `arrays`)


class RequestError(ValueError):
    """A bad request (HTTP 400); the message names the fix."""


class Encoded:
    """One request's rows (an encoding and its batch item per row) and its padded length:
    the length the request gets alone, whatever company it keeps."""

    def __init__(self, rows: list, length: int) -> None:
        self.rows, self.length = rows, length


class TextEncoder:
    def __init__(self, tokenizer_file: str, params, text_inputs: list, max_rows: int) -> None:
        """`params`: the model's config parameters (runtime.py's `Parameters`)."""
        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.measure = Tokenizer.from_file(tokenizer_file)  # no truncation, no padding
        self.measure.no_truncation()
        self.measure.no_padding()
        self.max_seq = params.read("max_seq", int)
        self.min_seq = params.read("min_seq", int)
        self.pad_id = params.read("pad_id", int)
        self.stride = params.read("stride", int)
        self.pad_multiple = params.read("pad_multiple", int)
        self.reject_long = params.read("overflow") == "reject"
        self.max_text_bytes = params.read("max_text_bytes", int)
        self.text_inputs, self.max_rows = list(text_inputs), max_rows
        self.last = len(self.text_inputs) - 1  # the sequence id of the text read in windows
        self.tokenizer.no_padding()  # padded per request, to its own longest text
        if self.reject_long:
            self.tokenizer.no_truncation()
        else:  # a pair loses tokens as `truncation` says; windows carry the rest over
            self.tokenizer.enable_truncation(
                max_length=self.max_seq, stride=self.stride, strategy=params.read("truncation")
            )

    def items(self, columns: list[list[str]]) -> list:
        """A request's batch items from its text columns: str, or (str, str) pairs."""
        if len({len(c) for c in columns}) > 1:
            raise RequestError(f"inputs {self.text_inputs} must have the same batch size")
        if not columns or not columns[0]:
            raise RequestError(f"the request has no texts: send at least one {self.text_inputs[0]}")
        if len(columns) == 1:
            return columns[0]
        if self.stride:  # windows need room for the context beyond the overlap
            room = self.max_seq - self.tokenizer.num_special_tokens_to_add(True) - 2 * self.stride
            for first in columns[0]:
                try:
                    length = len(self.measure.encode(first, add_special_tokens=False).ids)
                except BaseException as err:  # a tokenizers panic: this request's error only
                    raise RequestError(f"cannot tokenize {self.text_inputs[0]}: {err}") from None
                if length > room:
                    raise RequestError(
                        f"{self.text_inputs[0]} has {length} tokens; with windows of "
                        f"{self.max_seq} tokens overlapping by {self.stride} it may have at "
                        f"most {room}: shorten it, or build with a larger max seq"
                    )
        return list(zip(*columns))

    def encode(self, requests: list[list]) -> list:
        """Encoded (or the RequestError) per request; one tokenizer call for all of them."""
        try:
            everything = self.tokenizer.encode_batch([i for items in requests for i in items])
        except BaseException:  # tokenizers panics are BaseExceptions: find the bad request
            everything = None
        found, start = [], 0
        for items in requests:
            if everything is not None:
                encodings = everything[start : start + len(items)]
                start += len(items)
            else:
                try:
                    encodings = self.tokenizer.encode_batch(items)
                except BaseException as err:
                    found.append(RequestError(f"cannot tokenize this request: {err}"))
                    continue
            try:
                found.append(self._encoded(encodings))
            except RequestError as err:
                found.append(err)
        return found

    def _encoded(self, encodings) -> Encoded:
        rows = []
        for item, encoding in enumerate(encodings):
            rows.append((encoding, item))
            if self.stride:
                rows += [(window, item) for window in encoding.overflowing]
        longest = max(len(e.ids) for e, _ in rows)
        if self.reject_long and longest > self.max_seq:
            raise RequestError(
                f"a {self.text_inputs[0]} has {longest} tokens; this deployment takes at most "
                f"{self.max_seq} (seq=MIN,OPT,MAX): shorten it, or rebuild with a larger MAX"
            )
        if len(rows) > self.max_rows:
            raise RequestError(
                f"the texts of this request need {len(rows)} windows of {self.max_seq} tokens; "
                f"at most {self.max_rows} fit in one request: send fewer or shorter texts"
            )
        rounded = -(-longest // self.pad_multiple) * self.pad_multiple  # up to a multiple
        return Encoded(rows, max(self.min_seq, min(rounded, max(self.max_seq, longest))))

    def arrays(self, encoded: Encoded, outputs: list, length: int = 0) -> dict:
        """The named tensors of one request, padded to `length` (default: its own). Its own
        length is `seq_length`, whatever the padding."""
        rows, length = encoded.rows, length or encoded.length
        found = {}
        for name, dtype in outputs:
            if name == LENGTH_FIELD:
                array = np.full((len(rows), 1), encoded.length, dtype=dtype)
            elif name == "window_item":
                array = np.array([[item] for _, item in rows], dtype=dtype)
            elif name == "offsets":
                array = np.full((len(rows), length, 2), -1, dtype=dtype)
                for row, (encoding, _) in enumerate(rows):
                    for position, (sequence, span) in enumerate(
                        zip(encoding.sequence_ids, encoding.offsets)
                    ):
                        if sequence == self.last:
                            array[row, position] = span
            else:
                field = ENCODING_FIELDS[name]
                array = np.full((len(rows), length), self.pad_id if field == "ids" else 0, dtype)
                for row, (encoding, _) in enumerate(rows):
                    values = getattr(encoding, field)
                    array[row, : len(values)] = values
            found[name] = array
        return found


def length_groups(lengths: list, rows: list, waste: float, max_rows: int) -> list:
    """Request indices in groups that run as one call: sorted by padded length, a group grows
    while its padded tokens stay within `waste` x its real ones and its rows within
    `max_rows`."""
    groups, current, tokens, count = [], [], 0, 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        length, size = lengths[index], rows[index]
        padded = (count + size) * length  # this request is the longest so far
        if current and (padded > waste * (tokens + size * length) or count + size > max_rows):
            groups.append(current)
            current, tokens, count = [], 0, 0
        current.append(index)
        tokens += size * length
        count += size
    if current:
        groups.append(current)
    return groups


def numpy_type(onnx_type: str):
    """The numpy dtype of an ONNX Runtime input type such as 'tensor(int64)'."""
    name = onnx_type[len("tensor(") : -1] if onnx_type.startswith("tensor(") else onnx_type
    return np.dtype({"float": "float32", "double": "float64"}.get(name, name))


def texts_of(values, name: str, max_bytes: int) -> list[str]:
    """A BYTES tensor's values as text, or the RequestError that names the item and the fix:
    a text must be UTF-8, hold no NUL, hold more than whitespace, and fit in `max_bytes`."""
    found = []
    for index, value in enumerate(values):
        raw = value if isinstance(value, bytes) else str(value).encode()
        where = f"{name}[{index}]"
        if len(raw) > max_bytes:
            raise RequestError(
                f"{where} has {len(raw)} bytes; at most {max_bytes} bytes per text: send less"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(
                f"{where} is not UTF-8 text (byte {err.start} does not decode): send UTF-8"
            ) from None
        if "\x00" in text:
            raise RequestError(
                f"{where} holds a NUL character at {text.index(chr(0))}: send text without NUL"
            )
        if not text.strip():
            raise RequestError(f"{where} is empty (or only whitespace): send some text")
        found.append(text)
    return found
