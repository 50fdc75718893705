"""The local Triton server over gRPC, asyncio: unary inference, decoupled streams, readiness.

Triton's own protocol (tritonclient's protobufs) on one grpc.aio channel shared by every
request. A stream asks for Triton's empty final response (`triton_enable_empty_final_response`,
which tritonclient's asyncio `stream_infer` cannot ask for), so its end is known exactly, and
is cancelled when its reader stops early (a stop string found, a client gone).

Triton's refusals become the API's statuses: INVALID_ARGUMENT is the client's mistake (400);
UNAVAILABLE and RESOURCE_EXHAUSTED (a full queue, a model not ready) are 503; the rest 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
from api_errors import APIError
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

GRPC_KEY_HEADER = "triton-grpc-protocol-api-key"  # triton/supervisor/access.py's api-key
MAX_MESSAGE = 1 << 30
DATATYPES = {
    np.dtype(np.object_): "BYTES",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FP32",
}
NUMPY = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "FP16": np.float16}
STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.NOT_FOUND: 503,  # in the repository, not loaded in Triton
}
OVERLOAD_WORDS = ("queue", "unavailable", "not ready", "exceeds maximum")


def request(
    model: str, inputs: dict[str, np.ndarray], wanted: tuple[str, ...] = (), final: bool = False
):
    """A ModelInferRequest carrying `inputs` (numpy arrays: object arrays are BYTES), asking
    for the `wanted` outputs only (all when none are named)."""
    message = service_pb2.ModelInferRequest(model_name=model)
    for name in wanted:
        message.outputs.add(name=name)
    for name, array in inputs.items():
        datatype = DATATYPES[array.dtype]
        tensor = message.inputs.add(name=name, datatype=datatype, shape=array.shape)
        del tensor  # its contents go in raw_input_contents, in the same order
        raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        message.raw_input_contents.append(raw)
    if final:
        message.parameters["triton_enable_empty_final_response"].bool_param = True
    return message


def outputs(response) -> dict[str, np.ndarray]:
    """A ModelInferResponse's outputs as numpy arrays (BYTES as object arrays of bytes)."""
    found = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
        else:
            array = np.frombuffer(raw, dtype=NUMPY[tensor.datatype])
        found[tensor.name] = array.reshape(tuple(tensor.shape))
    return found


def failure(message: str, status: int | None = None) -> APIError:
    """Triton's refusal as an APIError, its status from the gRPC code or the message."""
    if status is None:
        overloaded = any(word in message.lower() for word in OVERLOAD_WORDS)
        status = 503 if overloaded else 500
    code = {400: "invalid_value", 503: "unavailable"}.get(status, "triton_error")
    return APIError(status, f"Triton: {message}", code=code)


class Triton:
    """One channel to the server at `url` (host:port); `api_key` is sent with each call.

    The channel is opened on first use: it belongs to the event loop that serves requests."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url
        self.metadata = ((GRPC_KEY_HEADER, api_key),) if api_key else ()
        self._stub = None

    @property
    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            channel = grpc.aio.insecure_channel(
                self.url,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                ],
            )
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return self._stub

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], wanted: tuple[str, ...] = ()
    ) -> dict[str, np.ndarray]:
        message = request(model, inputs, wanted)
        try:
            response = await self.stub.ModelInfer(message, metadata=self.metadata)
        except grpc.aio.AioRpcError as err:
            raise failure(err.details() or str(err.code()), STATUSES.get(err.code(), 500)) from None
        return outputs(response)

    async def stream(
        self, model: str, inputs: dict[str, np.ndarray], wanted: tuple[str, ...] = ()
    ) -> AsyncIterator[dict]:
        """The responses of one request to a decoupled model, as they come; cancelled on
        the server when the reader stops before the end."""

        async def one_request():
            yield request(model, inputs, wanted, final=True)

        call = self.stub.ModelStreamInfer(one_request(), metadata=self.metadata)
        try:
            async for response in call:
                if response.error_message:
                    raise failure(response.error_message)
                infer = response.infer_response
                if infer.outputs:
                    yield outputs(infer)
                if infer.parameters["triton_final_response"].bool_param:
                    return
        except grpc.aio.AioRpcError as err:
            raise failure(err.details() or str(err.code()), STATUSES.get(err.code(), 500)) from None
        finally:
            call.cancel()  # a no-op once the call ended; else Triton sees the request cancelled

    async def ready(self, model: str) -> bool:
        try:
            answer = await self.stub.ModelReady(
                service_pb2.ModelReadyRequest(name=model), metadata=self.metadata, timeout=2.0
            )
        except grpc.aio.AioRpcError:
            return False
        return answer.ready
