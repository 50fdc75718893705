"""Triton python-backend model: prompts' tokens in, generated text out (KV-cache decoding,
batched in flight).

Inputs: `input_ids`, `attention_mask` (from the tokenizer step) and the optional
`MAX_NEW_TOKENS`, `TEMPERATURE`, `TOP_K`, `TOP_P`, `SEED` ([batch, 1] each; omit TEMPERATURE,
TOP_K and TOP_P for greedy) and `STOP` ([batch, n] strings; the answer ends before the first
one). Outputs: `OUTPUT_TEXT` (the new text only) and `OUTPUT_IDS` (the new token ids, padded
with -1). A request with bad parameters gets an error and the others go on.

`execute` only checks requests and hands them to the in-flight loop (scheduler.py, a thread
of its own): the loop keeps decoding, rows join and leave it at every step, and each request
is answered through its response sender when its rows are done (or, decoupled, every few
steps: `stream_interval`, scheduler.Pace). The ONNX files, `tokenizer.json` and the loop's modules
(decoding.py, batch.py, detokenizer.py, scheduler.py, jobs.py) sit next to this file; or,
with the `step_models` parameter (decoder=models, and always on TensorRT), each exported
file is a Triton model of the deployment that the loop calls through BLS. Imports only
numpy, onnxruntime, tokenizers, Triton's utilities and the shared helpers (runtime.py, next
to this file).

The same code and files, configured decoupled, are `<name>_stream`: it takes TEXT itself and
sends the tokens as they come, every step or every few (`stream_interval`; gRPC streaming).
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
detokenizer = runtime.load(HERE, "detokenizer")
batch = runtime.load(HERE, "batch")  # after decoding, which it imports
scheduler = runtime.load(HERE, "scheduler")  # after encoding, which it imports
jobs = runtime.load(HERE, "jobs")


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

    Outputs come back as arrays the in-flight batch can cut and join: on a GPU with CuPy,
    cupy arrays over the outputs' own memory (DLPack: the cache never leaves the GPU, and
    goes back as the next step's input the same way); otherwise every output is asked for in
    CPU memory and copied into numpy (a response's memory is not the loop's to keep)."""

    def __init__(self, model: str, inputs: list, outputs: list) -> None:
        self.model, self.inputs, self.outputs = model, inputs, outputs
        self.cupy = _cupy()
        cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self.memory = {} if self.cupy is not None else {"preferred_memory": cpu}

    @staticmethod
    def _tensor(name: str, value):
        if isinstance(value, np.ndarray):
            return pb_utils.Tensor(name, np.ascontiguousarray(value))
        return pb_utils.Tensor.from_dlpack(name, value)  # a cupy array, on the GPU

    def _array(self, tensor):
        if tensor.is_cpu():
            return np.array(tensor.as_numpy())
        return self.cupy.from_dlpack(tensor)

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
        return {n: self._array(t) for n, t in tensors.items()}


class TritonPythonModel:
    def initialize(self, args):
        runtime.keep_heap()  # every step's outputs are fresh arrays, BLS steps' too
        config, params, version_dir = runtime.model_args(args)
        # The streaming twin (`<name>_stream`, decoupled) has the same files (its own, so that
        # a repository in object storage, fetched a model at a time, serves it) and tokenizes
        # TEXT itself: one response per step, as soon as it is decoded.
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_seq = params.read("max_seq", int)
        self.max_text_bytes = params.read("max_text_bytes", int)
        self.default_max_new = params.read("default_max_new_tokens", int)
        self.limit = params.read("max_new_tokens_limit", int)
        self.max_positions = params.read("max_positions", int)  # 0: no limit (relative positions)
        self.vocab_size = params.read("vocab_size", int)  # 0: unknown, ids go unchecked
        self.kind = params.read("kind")
        interval = params.read("stream_interval", int)  # steps per stream response; 0: auto
        responses = params.read("stream_responses", int)
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        step_models = params.read("step_models", json.loads)
        max_rows = max(int(config["max_batch_size"]), 1)  # the profile's batch MAX
        threads = params.read("intra_op_threads", int)
        slot_buffer = params.read("slot_buffer", int)
        files = {part: version_dir / f"{part}.onnx" for part in params.read("parts", json.loads)}
        kind = self.kind
        if step_models:  # decoder=models: each exported file is a Triton model of its own
            steps = {part: BlsStep(**step) for part, step in step_models.items()}
        elif slot_buffer:  # decoder=slots: each row's cache a slot written in place
            graph, mixed = files.values()  # the step's graph, its mixed twin
            slots = decoding.OnnxRuntimeSlotStep(
                graph, max_rows, slot_buffer, threads, params.read("spinning", int), mixed=mixed
            )
            steps = {"decoder_slots": slots}
            kind = "slots"
        else:
            steps = decoding.onnxruntime_steps(files, threads, params.read("spinning", int))
        running = batch.RunningBatch(
            kind,
            steps,
            pad_id=params.read("pad_token_id", int),
            start_id=params.read("decoder_start_token_id", int),
            cache_limit=params.read("cache_limit", int),
        )
        self.outcomes = jobs.Outcomes(config["name"])
        self.pace = scheduler.Pace(running, interval, responses)
        self.loop = scheduler.Scheduler(
            running,
            eos_ids=params.read("eos_token_ids", json.loads),
            max_rows=max_rows,
            max_waiting=params.read("max_queue", int),
            queue_timeout_s=params.read("queue_timeout_ms", int) / 1000,
            prefill_waste=params.read("prefill_waste", float),
            on_error=lambda err: pb_utils.Logger.log_error(f"generation step failed: {err}"),
        ).start()

    def finalize(self):
        self.loop.stop()
        seconds = self.loop.seconds
        share = seconds["decoding"] / seconds["loop"] if seconds["loop"] else 0.0
        pb_utils.Logger.log_info(
            f"generation loop: {self.loop.steps} steps, {share:.0%} of its time in the "
            f"decoding steps; requests {self.outcomes.counts}"
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

    @staticmethod
    def _stops(request, rows: int) -> list[tuple[str, ...]]:
        """Each row's stop strings (STOP, [rows, n]; empty ones are padding)."""
        tensor = pb_utils.get_input_tensor_by_name(request, "STOP")
        if tensor is None:
            return [()] * rows
        values = tensor.as_numpy()
        values = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
        if len(values) != rows:
            raise decoding.ParameterError(f"STOP has {len(values)} rows for {rows} prompts")
        try:
            return [tuple(v.decode("utf-8") for v in row if len(v)) for row in values]
        except UnicodeDecodeError:
            raise decoding.ParameterError("a STOP string is not UTF-8 text") from None

    def _texts_as_prompts(self, request):
        """TEXT tokenized here (the streaming model has no tokenizer step before it)."""
        texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        try:
            prompts = encoding.texts_of(texts, "TEXT", self.max_text_bytes)
        except encoding.RequestError as err:
            raise decoding.ParameterError(str(err)) from None
        encodings = self.tokenizer.encode_batch(prompts)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    @staticmethod
    def _prompts(request):
        """Each row's tokens: input_ids where attention_mask is 1 (padded either side)."""
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        if ids.shape != mask.shape:
            raise decoding.ParameterError(
                f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in shape"
            )
        return [row[kept == 1].astype(np.int64) for row, kept in zip(ids, mask)]

    def _check(self, prompts, params) -> None:
        """Each row alone within the deployment (so that no step leaves the profile: see
        scheduler.py), whoever tokenized it: a request calling `<name>_generate` directly with
        its own input_ids too. Past the door a bad row would fail the step, and with it every
        request in the batch."""
        for prompt, p in zip(prompts, params):
            if self.kind == "causal" and len(prompt) == 0:
                raise decoding.ParameterError("a TEXT is empty: a causal LM needs a token")
            if len(prompt) > self.max_seq:
                raise decoding.ParameterError(
                    f"a prompt has {len(prompt)} tokens; this deployment takes at most "
                    f"{self.max_seq} (seq=MIN,OPT,MAX): shorten it, or rebuild with a larger MAX"
                )
            outside = runtime.outside_vocabulary(prompt, self.vocab_size)
            if outside:
                raise decoding.ParameterError(outside)
            if self.max_positions and len(prompt) + p.max_new_tokens > self.max_positions:
                raise decoding.ParameterError(
                    f"a prompt of {len(prompt)} tokens + MAX_NEW_TOKENS={p.max_new_tokens} "
                    f"exceeds the model's {self.max_positions} positions"
                )

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _job(self, request):
        """The request's rows, checked: a ParameterError names what is wrong."""
        prompts = self._texts_as_prompts(request) if self.streaming else self._prompts(request)
        params = self._params(request, len(prompts))
        self._check(prompts, params)
        stops = self._stops(request, len(prompts))
        rows = [
            scheduler.Row(prompt, p, detokenizer.TextStream(self._decode, stop))
            for prompt, p, stop in zip(prompts, params, stops)
        ]
        return jobs.Job(request, rows, self.streaming, self.outcomes, self.pace)

    def execute(self, requests):
        for request in requests:
            try:
                job = self._job(request)
            except decoding.ParameterError as err:
                request.get_response_sender().send(runtime.bad_request(str(err)), flags=jobs.FINAL)
                continue
            if not self.loop.submit(job):  # as a full Triton queue refuses: at once
                job.reject(scheduler.QUEUE_FULL)
        return None
