"""Triton python-backend model: prompts' tokens in, generated text out (KV-cache decoding).

Inputs: `input_ids`, `attention_mask` (from the tokenizer step) and the optional
`MAX_NEW_TOKENS`, `TEMPERATURE`, `TOP_K`, `TOP_P`, `SEED` ([batch, 1] each; omit TEMPERATURE,
TOP_K and TOP_P for greedy). Outputs: `OUTPUT_TEXT` (the new text only) and `OUTPUT_IDS`
(the new token ids, padded with -1). All rows of all requests that arrive together decode
together; a request with bad parameters gets an error and the others go on.
The ONNX files, `tokenizer.json` and `decoding.py` sit next to this file; or, with the
`step_models` parameter (decoder=models, and always on TensorRT), each exported file is a Triton
model of the deployment that the loop calls through BLS. Imports only numpy, onnxruntime,
tokenizers, Triton's utilities and the shared helpers (runtime.py, next to this file).

The same code and files, configured decoupled, are `<name>_stream`: it takes TEXT itself and
sends each decoding step's tokens as they come (gRPC streaming).
"""

import json
from pathlib import Path

import llm_in_triton_runtime as runtime  # the shared helpers, shipped beside this file
import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent

decoding = runtime.load(HERE, "decoding")
encoding = runtime.load(HERE, "encoding")  # the tokenizer's text rules, for the stream's TEXT


def _has_gpu() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


_CUPY_WARNED = []


def _cupy():
    """CuPy when a GPU is there to read logits from (the server image has it), else None.

    Without it on a GPU server every step's KV cache crosses to CPU shared memory and back:
    correct, but slow and shm-hungry, so it is logged once per process, loudly."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
        reason = "CuPy sees no GPU"
    except Exception as err:  # not installed, or no usable GPU
        reason = f"CuPy is unusable ({type(err).__name__}: {err})"
    if _has_gpu() and not _CUPY_WARNED:
        _CUPY_WARNED.append(reason)
        pb_utils.Logger.log_error(
            f"llm-in-triton: {reason} on a GPU server: every decoding step now copies its KV "
            "cache through CPU shared memory. Install CuPy for the server's CUDA (the "
            "Dockerfile's server stage installs cupy-cuda13x) to keep it on the GPU."
        )
    return None


class BlsStep:
    """A decoding step served by another Triton model (a TensorRT engine, an ONNX file),
    called through BLS.

    Only the logits come back to numpy. Every other output (the KV cache, the encoder's
    states) stays a Triton tensor where it is, and is renamed (DLPack) into the next step's
    input, never converted: on a GPU the cache never leaves it, when CuPy is there to read the
    logits; without CuPy all outputs are asked for in CPU memory."""

    def __init__(self, model: str, inputs: list, outputs: list) -> None:
        self.model, self.inputs, self.outputs = model, inputs, outputs
        self.cupy = _cupy()
        cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self.memory = {} if self.cupy is not None else {"preferred_memory": cpu}

    @staticmethod
    def _tensor(name: str, value):
        if isinstance(value, np.ndarray):
            return pb_utils.Tensor(name, np.ascontiguousarray(value))
        return pb_utils.Tensor.from_dlpack(name, value)  # an earlier step's output, renamed

    def _array(self, tensor) -> np.ndarray:
        if tensor.is_cpu():
            return tensor.as_numpy()
        return self.cupy.from_dlpack(tensor)[:, -1:].get()  # the loop reads the last position

    def __call__(self, feed: dict) -> dict:
        request = pb_utils.InferenceRequest(
            model_name=self.model,
            inputs=[self._tensor(n, feed[n]) for n in self.inputs],
            requested_output_names=self.outputs,
            **self.memory,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model}: {response.error().message()}")
        tensors = {n: pb_utils.get_output_tensor_by_name(response, n) for n in self.outputs}
        return {n: self._array(t) if n == decoding.LOGITS else t for n, t in tensors.items()}


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = runtime.model_args(args)
        # The streaming twin (`<name>_stream`, decoupled) has the same files (its own, so that
        # a repository in object storage, fetched a model at a time, serves it) and tokenizes
        # TEXT itself: one token per response, as soon as it is decoded.
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_seq = params.read("max_seq", int)
        self.max_text_bytes = params.read("max_text_bytes", int)
        self.default_max_new = params.read("default_max_new_tokens", int)
        self.limit = params.read("max_new_tokens_limit", int)
        self.max_positions = params.read("max_positions", int)  # 0: no limit (relative positions)
        self.kind = params.read("kind")
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        step_models = params.read("step_models", json.loads)
        if step_models:  # decoder=models: each exported file is a Triton model of its own
            steps = {part: BlsStep(**step) for part, step in step_models.items()}
        else:
            parts = params.read("parts", json.loads)
            files = {part: version_dir / f"{part}.onnx" for part in parts}
            steps = decoding.onnxruntime_steps(files, params.read("intra_op_threads", int))
        self.generator = decoding.Generator(
            self.kind,
            steps,
            eos_ids=params.read("eos_token_ids", json.loads),
            pad_id=params.read("pad_token_id", int),
            start_id=params.read("decoder_start_token_id", int),
            cache_limit=params.read("cache_limit", int),
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

    def _texts_as_prompts(self, request):
        """TEXT tokenized here (the streaming model has no tokenizer step before it)."""
        texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        try:
            prompts = encoding.texts_of(texts, "TEXT", self.max_text_bytes)
        except encoding.RequestError as err:
            raise decoding.ParameterError(str(err)) from None
        encodings = self.tokenizer.encode_batch(prompts)
        prompts = [np.array(e.ids, dtype=np.int64) for e in encodings]
        for prompt in prompts:
            if len(prompt) > self.max_seq:
                raise decoding.ParameterError(
                    f"a TEXT has {len(prompt)} tokens; this deployment takes at most "
                    f"{self.max_seq} (seq=MIN,OPT,MAX): shorten it, or rebuild with a larger MAX"
                )
            if self.kind == "causal" and len(prompt) == 0:
                raise decoding.ParameterError("a TEXT is empty: a causal LM needs a token")
        return prompts

    def _stream(self, request):
        """Decode one request, sending each step's tokens as a response of their own."""
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompts = self._texts_as_prompts(request)
            params = self._params(request, len(prompts))
            self._check_positions(prompts, params)
        except decoding.ParameterError as err:
            sender.send(runtime.bad_request(str(err)), flags=final)
            return
        ids, mask = self._padded(prompts)
        so_far = [[] for _ in prompts]
        texts = [""] * len(prompts)

        def send_step(tokens, produced):
            pieces, out_ids = [], []
            for row, made in enumerate(produced):
                piece, token = "", -1
                if made:
                    so_far[row].append(int(tokens[row]))
                    text = self.tokenizer.decode(so_far[row], skip_special_tokens=True)
                    piece, texts[row], token = text[len(texts[row]) :], text, int(tokens[row])
                pieces.append([piece.encode("utf-8")])
                out_ids.append([token])
            sender.send(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT_TEXT", np.array(pieces, dtype=object)),
                        pb_utils.Tensor("OUTPUT_IDS", np.array(out_ids, dtype=np.int64)),
                    ]
                )
            )

        try:
            self.generator.generate(ids, mask, params, on_step=send_step)
        except Exception as err:  # ONNX Runtime errors end this stream, not the server
            sender.send(runtime.failed(f"generation failed: {err}"), flags=final)
            return
        sender.send(flags=final)

    def _check_positions(self, prompts, params):
        for prompt, p in zip(prompts, params):
            if self.max_positions and len(prompt) + p.max_new_tokens > self.max_positions:
                raise decoding.ParameterError(
                    f"a prompt of {len(prompt)} tokens + MAX_NEW_TOKENS={p.max_new_tokens} "
                    f"exceeds the model's {self.max_positions} positions"
                )

    def _padded(self, prompts):
        width = max(len(prompt) for prompt in prompts)
        ids = np.full((len(prompts), width), self.generator.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        return ids, mask

    def _prompts(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        lengths = mask.sum(axis=1)
        if self.kind == "causal" and (lengths == 0).any():
            raise decoding.ParameterError("a TEXT is empty: a causal LM needs at least one token")
        return [ids[row, :length] for row, length in enumerate(lengths)]

    def execute(self, requests):
        if self.streaming:
            for request in requests:
                self._stream(request)
            return None
        responses = [None] * len(requests)
        rows = []  # (request index, prompt ids, params)
        for index, request in enumerate(requests):
            try:
                prompts = self._prompts(request)
                params = self._params(request, len(prompts))
                self._check_positions(prompts, params)
            except decoding.ParameterError as err:
                responses[index] = runtime.bad_request(str(err))
                continue
            rows += [(index, prompt, p) for prompt, p in zip(prompts, params)]
        if rows:
            try:
                self._decode(rows, responses)
            except Exception as err:  # ONNX Runtime or BLS errors: fail these, keep serving
                for index in {i for i, _, _ in rows}:
                    responses[index] = runtime.failed(f"generation failed: {err}")
        return responses

    def _decode(self, rows, responses):
        ids, mask = self._padded([prompt for _, prompt, _ in rows])
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
