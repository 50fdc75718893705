#!/usr/bin/env python3
"""Send text to a Triton deployment and print its answer readably (HTTP or gRPC).

    python triton/send_request.py -u 127.0.0.1:8000 -m encode -t "Hello" -t "World"
    python triton/send_request.py -m qa -i QUESTION:CONTEXT -t "Who?" -t "Ann wrote it."
    echo "some text" | python triton/send_request.py -m seqcls --protocol grpc -u 127.0.0.1:8001
    python triton/send_request.py -m encode --statistics

Texts come from -t (repeatable), --file (one per line) or stdin. With several inputs
(-i A:B) consecutive texts fill A, B, A, B...: each batch item takes one text per input.
A server that requires an API key gets it from $LLM_IN_TRITON_API_KEY or the file named by
$LLM_IN_TRITON_API_KEY_FILE (never an argument: `ps` shows those to everyone).
Runs against any Triton server; imports nothing from the build.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

SAMPLE = "Hello, I'm a machine learning engineer, my duty is to serve models."
# option -> (Triton datatype, Python type, numpy type) of the optional generation inputs
GENERATION_OPTIONS = {
    "max_new_tokens": ("INT32", int, np.int32),
    "temperature": ("FP32", float, np.float32),
    "top_k": ("INT32", int, np.int32),
    "top_p": ("FP32", float, np.float32),
    "seed": ("INT64", int, np.int64),
}
STOP = "STOP"  # generation's optional stop strings (BYTES, not a text to fill)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-u",
        "--url",
        default=None,
        help="host:port (default 127.0.0.1:8000 for http, :8001 for grpc)",
    )
    parser.add_argument("-m", "--model", default="encode", help="model or ensemble name")
    parser.add_argument(
        "-i",
        "--inputs",
        default=None,
        help="input names, ':'-separated (default: the model's inputs)",
    )
    parser.add_argument(
        "-o",
        "--outputs",
        default=None,
        help="output names, ':'-separated (default: all the model's outputs)",
    )
    parser.add_argument("-t", "--text", action="append", default=[], help="a text (repeatable)")
    parser.add_argument("--file", help="a file with one text per line")
    parser.add_argument(
        "-b",
        "--batch_size",
        type=int,
        default=None,
        help="batch items to send (texts repeat to fill it)",
    )
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument(
        "--statistics",
        action="store_true",
        help="print the server's per-model statistics after the request",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="generation: print tokens as they come (gRPC, model <name>_stream)",
    )
    generation = parser.add_argument_group("generation (t5, causallm; omit all for greedy)")
    for flag, kind in GENERATION_OPTIONS.items():
        generation.add_argument(
            f"--{flag}",
            type=kind[1],
            default=None,
            help=f"sent as {flag.upper()} for every batch item",
        )
    generation.add_argument(
        "--stop",
        action="append",
        default=[],
        help="a stop string (repeatable): the answer ends before the first one it makes",
    )
    args = parser.parse_args(argv)
    if args.url is None:
        args.url = "127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000"
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.stream:
        if args.protocol != "grpc":
            parser.error("--stream needs --protocol grpc (HTTP has no streaming inference)")
        if not args.model.endswith("_stream"):
            args.model += "_stream"
    return args


def read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text)
    if args.file:
        with open(args.file, encoding="utf-8") as handle:
            texts += [line.rstrip("\n") for line in handle if line.strip()]
    if not texts and not sys.stdin.isatty():
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return texts


class Client:
    """The few calls needed, the same over HTTP and gRPC."""

    def __init__(self, protocol: str, url: str, timeout: float) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.protocol, self.module, self.timeout = protocol, module, timeout
        kwargs = {} if protocol == "grpc" else {"network_timeout": timeout}
        self.client = module.InferenceServerClient(url, **kwargs)
        access().authorize(self.client, protocol)

    def metadata(self, model: str) -> dict:
        if self.protocol == "grpc":
            return self.client.get_model_metadata(model, as_json=True)
        return self.client.get_model_metadata(model)

    def config(self, model: str) -> dict:
        if self.protocol == "grpc":
            return self.client.get_model_config(model, as_json=True)["config"]
        return self.client.get_model_config(model)

    def infer(
        self,
        model: str,
        arrays: dict[str, np.ndarray],
        datatypes: dict[str, str],
        outputs: list[str],
    ):
        inputs = []
        for name, array in arrays.items():
            tensor = self.module.InferInput(name, list(array.shape), datatypes[name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [self.module.InferRequestedOutput(name) for name in outputs]
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        return self.client.infer(model, inputs, outputs=requested, **kwargs)

    def stream(self, model: str, arrays: dict[str, np.ndarray], datatypes: dict[str, str]):
        """Results of a decoupled model as they arrive (gRPC), until its final response."""
        import queue

        inputs = []
        for name, array in arrays.items():
            tensor = self.module.InferInput(name, list(array.shape), datatypes[name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        arrived: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: arrived.put((result, error)))
        try:
            self.client.async_stream_infer(model, inputs, enable_empty_final_response=True)
            while True:
                result, error = arrived.get(timeout=self.timeout)
                if error is not None:
                    raise error
                response = result.get_response()
                if response.outputs:
                    yield result
                if response.parameters["triton_final_response"].bool_param:
                    return
        finally:
            self.client.stop_stream()

    def statistics(self) -> list[dict]:
        if self.protocol == "grpc":
            stats = self.client.get_inference_statistics(as_json=True)
        else:
            stats = self.client.get_inference_statistics()
        return stats.get("model_stats", [])

    def close(self) -> None:
        self.client.close()


def access():
    """triton/supervisor/access.py (the API key's header), loaded by path: no package here."""
    path = Path(__file__).resolve().parent / "supervisor" / "access.py"
    spec = importlib.util.spec_from_file_location("llm_in_triton_access", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_arrays(texts: list[str], inputs: list[dict], batch_size: int | None) -> dict:
    """One [batch, 1] BYTES array per input; consecutive texts fill the inputs in turn."""
    width = len(inputs)
    if len(texts) % width:
        raise SystemExit(
            f"{len(texts)} texts do not fill inputs {[i['name'] for i in inputs]} "
            f"evenly: give {width} texts per batch item"
        )
    items = [texts[i : i + width] for i in range(0, len(texts), width)]
    if batch_size is not None:
        items = [items[i % len(items)] for i in range(batch_size)]
    return {
        spec["name"]: np.array([[item[col].encode("utf-8")] for item in items], dtype=object)
        for col, spec in enumerate(inputs)
    }


def describe(name: str, array: np.ndarray) -> list[str]:
    """Readable lines for one output: text as text, small vectors in full, big ones in brief."""
    lines = [f"{name}: {array.dtype} {list(array.shape)}"]
    for row, value in enumerate(array):
        if array.dtype == object:
            flat = [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in np.asarray(value).reshape(-1)
            ]
            shown = flat[0] if len(flat) == 1 else flat
            lines.append(f"  [{row}] {shown!r}")
            continue
        if np.issubdtype(array.dtype, np.integer):  # token ids; -1 pads
            lines.append(f"  [{row}] {[int(v) for v in np.asarray(value).reshape(-1) if v != -1]}")
            continue
        value = np.asarray(value, dtype=np.float64)
        if value.size <= 10:
            extra = f" argmax {int(value.argmax())}" if value.ndim == 1 and value.size > 1 else ""
            lines.append(f"  [{row}] {np.array2string(value, precision=4)}{extra}")
        else:
            head = np.array2string(value.reshape(-1)[:4], precision=4)
            lines.append(
                f"  [{row}] shape {list(value.shape)}, L2 norm "
                f"{np.linalg.norm(value):.4f}, first values {head}"
            )
    return lines


def print_stream(results) -> int:
    """Each row's text as it grows; the text and token ids of every row at the end."""
    texts: list[str] = []
    ids: list[list[int]] = []
    for result in results:
        pieces = [v[0].decode("utf-8", "replace") for v in result.as_numpy("OUTPUT_TEXT")]
        if not texts:
            texts, ids = [""] * len(pieces), [[] for _ in pieces]
        for row, (piece, tokens) in enumerate(zip(pieces, result.as_numpy("OUTPUT_IDS"))):
            texts[row] += piece  # a response holds stream_interval steps: -1 pads a row
            ids[row] += [int(token) for token in tokens if token != -1]
        if len(pieces) == 1:
            print(pieces[0], end="", flush=True)
    print()
    for row, (text, tokens) in enumerate(zip(texts, ids)):
        print(f"[{row}] {text!r} {tokens}")
    return 0


def statistics_lines(stats: list[dict]) -> list[str]:
    """Per model with traffic: counts and the average time of each phase in ms."""
    lines = ["statistics (average ms per request):"]
    for model in stats:
        count = int(model.get("inference_count", 0))
        executions = int(model.get("execution_count", 0))
        infer = model.get("inference_stats", {})
        success = int(infer.get("success", {}).get("count", 0))
        if not success:
            continue

        def avg(phase: str, stats_=infer, n=success) -> float:
            return int(stats_.get(phase, {}).get("ns", 0)) / n / 1e6

        lines.append(
            f"  {model['name']} v{model.get('version', '')}: {success} requests, {count} "
            f"inferences, {executions} executions | queue {avg('queue'):.2f} compute input "
            f"{avg('compute_input'):.2f} infer {avg('compute_infer'):.2f} output "
            f"{avg('compute_output'):.2f} | failures {infer.get('fail', {}).get('count', 0)}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = Client(args.protocol, args.url, args.timeout)
    try:
        metadata = client.metadata(args.model)
        inputs = [  # the texts
            i for i in metadata["inputs"] if i["datatype"] == "BYTES" and i["name"] != STOP
        ]
        if args.inputs:
            by_name = {i["name"]: i for i in inputs}
            unknown = [n for n in args.inputs.split(":") if n not in by_name]
            if unknown:
                raise SystemExit(
                    f"model {args.model} has no input {unknown}; it has {sorted(by_name)}"
                )
            inputs = [by_name[n] for n in args.inputs.split(":")]
        texts = read_texts(args) or [SAMPLE] * len(inputs)
        outputs = (
            args.outputs.split(":") if args.outputs else [o["name"] for o in metadata["outputs"]]
        )
        arrays = build_arrays(texts, inputs, args.batch_size)
        datatypes = {i["name"]: i["datatype"] for i in inputs}
        rows = len(next(iter(arrays.values())))
        for flag, (datatype, _, numpy_type) in GENERATION_OPTIONS.items():
            if getattr(args, flag) is not None:
                arrays[flag.upper()] = np.full((rows, 1), getattr(args, flag), dtype=numpy_type)
                datatypes[flag.upper()] = datatype
        if args.stop:
            stops = [s.encode("utf-8") for s in args.stop]
            arrays[STOP] = np.array([stops] * rows, dtype=object)
            datatypes[STOP] = "BYTES"
        if args.stream:
            return print_stream(client.stream(args.model, arrays, datatypes))
        result = client.infer(args.model, arrays, datatypes, outputs)
        print(
            f"{args.model} via {args.protocol}://{args.url}: {len(next(iter(arrays.values())))} "
            "item(s)"
        )
        for name in outputs:
            print("\n".join(describe(name, result.as_numpy(name))))
        if args.statistics:
            print("\n".join(statistics_lines(client.statistics())))
    except OSError as err:  # the HTTP client's connection errors
        print(
            f"cannot reach Triton at {args.url} ({err}); is it running? (doit serve)",
            file=sys.stderr,
        )
        return 2
    except Exception as err:  # tritonclient raises InferenceServerException and others
        if type(err).__name__ != "InferenceServerException":
            raise
        print(f"error from the server: {err}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
