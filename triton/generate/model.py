"""Triton python-backend model: prompts' tokens in, generated text out (KV-cache decoding).

Inputs: `input_ids`, `attention_mask` (from the tokenizer step) and the optional
`MAX_NEW_TOKENS`, `TEMPERATURE`, `TOP_K`, `TOP_P`, `SEED` ([batch, 1] each; omit TEMPERATURE,
TOP_K and TOP_P for greedy). Outputs: `OUTPUT_TEXT` (the new text only) and `OUTPUT_IDS`
(the new token ids, padded with -1). All rows of all requests that arrive together decode
together; a request with bad parameters gets an error and the others go on.
The ONNX files, `tokenizer.json` and `decoding.py` sit next to this file. Imports only numpy,
onnxruntime, tokenizers and Triton's utilities.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


def _load_decoding():
    spec = importlib.util.spec_from_file_location("llm_in_triton_decoding", HERE / "decoding.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


decoding = _load_decoding()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.default_max_new = int(params["default_max_new_tokens"])
        self.limit = int(params["max_new_tokens_limit"])
        self.max_positions = int(params["max_positions"])  # 0: no limit (relative positions)
        self.kind = params["kind"]
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        start = params["decoder_start_token_id"]
        self.generator = decoding.Generator(
            self.kind,
            {part: version_dir / f"{part}.onnx" for part in json.loads(params["parts"])},
            eos_ids=json.loads(params["eos_token_ids"]),
            pad_id=int(params["pad_token_id"]),
            start_id=int(start),
            threads=int(params["intra_op_threads"]),
        )

    def _optional(self, request, name, rows, default, cast):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return [default] * rows
        values = tensor.as_numpy().reshape(-1)
        if len(values) != rows:
            raise decoding.ParameterError(f"{name} has {len(values)} values for {rows} prompts")
        return [cast(v) for v in values]

    def _params(self, request, rows: int) -> list:
        given = {
            n: pb_utils.get_input_tensor_by_name(request, n) is not None
            for n in ("TEMPERATURE", "TOP_K", "TOP_P")
        }
        columns = zip(
            self._optional(request, "MAX_NEW_TOKENS", rows, self.default_max_new, int),
            self._optional(request, "TEMPERATURE", rows, 1.0, float),
            self._optional(request, "TOP_K", rows, 0, int),
            self._optional(request, "TOP_P", rows, 1.0, float),
            self._optional(request, "SEED", rows, None, int),
        )
        return [
            decoding.RowParams(n, any(given.values()), t, k, p, s).validate(self.limit)
            for n, t, k, p, s in columns
        ]

    def _prompts(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        lengths = mask.sum(axis=1)
        if self.kind == "causal" and (lengths == 0).any():
            raise decoding.ParameterError("a TEXT is empty: a causal LM needs at least one token")
        return [ids[row, :length] for row, length in enumerate(lengths)]

    def execute(self, requests):
        responses = [None] * len(requests)
        rows = []  # (request index, prompt ids, params)
        for index, request in enumerate(requests):
            try:
                prompts = self._prompts(request)
                params = self._params(request, len(prompts))
                for prompt, p in zip(prompts, params):
                    if self.max_positions and len(prompt) + p.max_new_tokens > self.max_positions:
                        raise decoding.ParameterError(
                            f"a prompt of {len(prompt)} tokens + MAX_NEW_TOKENS="
                            f"{p.max_new_tokens} exceeds the model's {self.max_positions} positions"
                        )
            except decoding.ParameterError as err:
                responses[index] = _invalid(str(err))
                continue
            rows += [(index, prompt, p) for prompt, p in zip(prompts, params)]
        if rows:
            try:
                self._decode(rows, responses)
            except Exception as err:  # ONNX Runtime errors: fail these requests, keep serving
                for index in {i for i, _, _ in rows}:
                    error = pb_utils.TritonError(f"generation failed: {err}")
                    responses[index] = pb_utils.InferenceResponse(error=error)
        return responses

    def _decode(self, rows, responses):
        width = max(len(prompt) for _, prompt, _ in rows)
        ids = np.full((len(rows), width), self.generator.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, (_, prompt, _) in enumerate(rows):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        produced = self.generator.generate(ids, mask, [p for _, _, p in rows])
        for index in sorted({i for i, _, _ in rows}):
            mine = [tokens for (i, _, _), tokens in zip(rows, produced) if i == index]
            longest = max(len(t) for t in mine)
            out_ids = np.full((len(mine), longest), -1, dtype=np.int64)
            for row, tokens in enumerate(mine):
                out_ids[row, : len(tokens)] = tokens
            texts = self.tokenizer.decode_batch(mine, skip_special_tokens=True)
            out_text = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("OUTPUT_TEXT", out_text),
                    pb_utils.Tensor("OUTPUT_IDS", out_ids),
                ]
            )


def _invalid(message: str):
    """A bad request (HTTP 400), not a server failure."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = (
        pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    )
    return pb_utils.InferenceResponse(error=error)
