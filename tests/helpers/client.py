"""One test client for a running Triton server, over HTTP or gRPC: named values in, named
arrays out. Tests send their requests through it rather than building tritonclient inputs
by hand.

A value is a list of texts (BYTES, one per batch item: shape [n, 1]), a numpy array (its
Triton type from its dtype; object arrays are BYTES), or a `Raw` tensor that says its own
type and shape, for requests that are wrong on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Raw:
    """A tensor as a bad request sends it: its declared type, its data, the shape it claims
    (None: the data's own)."""

    datatype: str
    array: np.ndarray
    shape: list[int] | None = None


def as_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return np.array([[v.encode() if isinstance(v, str) else v] for v in value], dtype=object)


class Client:
    """A tritonclient client of `server` (anything with http_url and grpc_url)."""

    def __init__(self, server, protocol: str = "http") -> None:
        if protocol == "grpc":
            import tritonclient.grpc as module

            url = server.grpc_url
        else:
            import tritonclient.http as module

            url = server.http_url
        self.module, self.protocol = module, protocol
        self.client = module.InferenceServerClient(url)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def tensors(self, inputs) -> list:
        """Tensors of {name: value}, or of (name, value) pairs (a name may repeat there)."""
        from tritonclient.utils import np_to_triton_dtype

        found = []
        for name, value in inputs.items() if isinstance(inputs, dict) else inputs:
            raw = value if isinstance(value, Raw) else None
            array = raw.array if raw else as_array(value)
            datatype = raw.datatype if raw else np_to_triton_dtype(array.dtype)
            tensor = self.module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            if raw and raw.shape is not None:
                tensor.set_shape(raw.shape)  # what the request claims, not what it holds
            found.append(tensor)
        return found

    def infer(self, model: str, inputs) -> dict[str, np.ndarray]:
        """{output: array} of one request; raises tritonclient's InferenceServerException."""
        result = self.client.infer(model, self.tensors(inputs))
        response = result.get_response(as_json=True) if self.protocol == "grpc" else None
        outputs = (response or result.get_response())["outputs"]
        return {o["name"]: result.as_numpy(o["name"]) for o in outputs}

    def refusal(self, model: str, inputs) -> tuple[str | None, str]:
        """(None, '') when the request is answered, else (its status, its message)."""
        from tritonclient.utils import InferenceServerException

        try:
            self.client.infer(model, self.tensors(inputs))
        except InferenceServerException as err:
            return str(err.status()), err.message()
        return None, ""

    def input_names(self, model: str) -> list[str]:
        metadata = self.client.get_model_metadata(model)
        if self.protocol == "grpc":
            return [i.name for i in metadata.inputs]
        return [i["name"] for i in metadata["inputs"]]

    def statistics(self) -> dict[str, int]:
        """Inference counts per model (the server's statistics)."""
        stats = self.client.get_inference_statistics()
        if self.protocol == "grpc":
            return {s.name: s.inference_count for s in stats.model_stats}
        return {s["name"]: s["inference_count"] for s in stats["model_stats"]}


def infer(server, protocol: str, model: str, inputs) -> dict[str, np.ndarray]:
    """One request on a fresh client."""
    with Client(server, protocol) as client:
        return client.infer(model, inputs)


def raw_request(server, model: str, inputs: list[tuple[str, list, str, np.ndarray]]) -> str:
    """Send exactly these (name, shape, datatype, data) inputs over HTTP; return the server's
    error as tritonclient prints it, '[status] message' ('' on success)."""
    with Client(server) as client:
        status, message = client.refusal(
            model, [(n, Raw(t, a, shape)) for n, shape, t, a in inputs]
        )
    return f"[{status}] {message}" if status else ""


def text_array(count: int) -> np.ndarray:
    """`count` copies of one text, as a BYTES array [count, 1]."""
    return np.array([[b"some text"]] * count, dtype=object)
