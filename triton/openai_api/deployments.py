"""The deployments of a model repository folder, as the API serves them.

A deployment is an ensemble `<name>` whose config carries the `task` parameter (written by the
build's pbtxt stage from tasks/catalog.py). What the API needs of it comes from the configs
and files beside them: the Triton models requests go to (`<name>`; and `<name>_stream` for
streamed generation), its limits, its tokenizer (usage
is counted with it) and, for causal LMs, its chat template (chat.json).

The folder is read, not Triton's repository index (model control needs the admin secret), and
read again when a config changes: a deployment added while the server runs is served.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from chat import ChatTemplate
from tokenizers import Tokenizer

GENERATION = ("causallm", "t5")
STREAM_SUFFIX = "_stream"  # tasks/catalog.py PART_SUFFIXES["stream"]
CHAT_FILE = "chat.json"  # tasks/paths.py CHAT_FILE
RESCAN_SECONDS = 2.0


def read_config(path: Path):
    """A config.pbtxt as Triton's ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def parameters(config) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


@dataclass(frozen=True)
class Step:
    """A step of an ensemble: its model, and its tensors' names in the ensemble (the model's
    input or output name -> the ensemble tensor's)."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


@dataclass
class Deployment:
    name: str
    task: str
    target: str  # the Triton model requests go to: the ensemble <name>
    inputs: frozenset[str]  # its input names (STOP, where the model takes it)
    models: tuple[str, ...]  # every Triton model it needs: what /health asks
    tokenizer: Tokenizer
    max_batch: int
    max_seq: int  # prompt tokens (generation) or tokens kept (encoders cut the rest)
    created: int
    chat: ChatTemplate | None = None
    eos_ids: frozenset[int] = frozenset()
    default_max_tokens: int = 0
    max_tokens_limit: int = 0
    max_positions: int = 0  # causal: prompt + new tokens; 0: no limit
    chat_error: str = ""  # a chat template that does not compile
    stream: str = ""  # generation: the streaming model, <name>_stream
    stream_inputs: frozenset[str] = frozenset()
    steps: tuple[Step, ...] = ()  # generation: the ensemble's steps, which whole answers call

    def count(self, text: str) -> int:
        """Tokens of `text` as the deployment's tokenizer makes them (special tokens too).
        The batch call without offsets: the same ids, a third less time than `encode`."""
        return len(self.tokenizer.encode_batch_fast([text])[0].ids)


def load_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def version_folder(model_dir: Path, config) -> Path:
    """The version of a model Triton serves: the one its version_policy names (a published
    repository's config names exactly one), else the latest, Triton's default policy."""
    named = list(config.version_policy.specific.versions)
    if named:
        return model_dir / str(max(named))
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return model_dir / str(max(versions, default=1))


def load(repository: Path, ensemble) -> Deployment:
    """A Deployment from its ensemble's config and the configs and files of its parts."""
    name, task = ensemble.name, parameters(ensemble)["task"]
    steps = tuple(step.model_name for step in ensemble.ensemble_scheduling.step)
    created = int((repository / name / "config.pbtxt").stat().st_mtime)
    if task in GENERATION:
        stream = f"{name}{STREAM_SUFFIX}"
        config = read_config(repository / stream / "config.pbtxt")
        params = parameters(config)
        folder = version_folder(repository / stream, config)
        chat, chat_error = None, ""
        try:
            chat = ChatTemplate.load(folder / CHAT_FILE)
        except Exception as err:  # jinja2's syntax errors, a broken file: said on use
            chat_error = f"{type(err).__name__}: {err}"
        return Deployment(
            name=name,
            task=task,
            target=name,
            inputs=frozenset(t.name for t in ensemble.input),
            stream=stream,
            stream_inputs=frozenset(t.name for t in config.input),
            steps=tuple(
                Step(step.model_name, dict(step.input_map), dict(step.output_map))
                for step in ensemble.ensemble_scheduling.step
            ),
            models=(name, *steps, stream),
            tokenizer=load_tokenizer(folder / "tokenizer.json"),
            max_batch=config.max_batch_size,
            max_seq=int(params["max_seq"]),
            created=created,
            chat=chat,
            chat_error=chat_error,
            eos_ids=frozenset(json.loads(params["eos_token_ids"])),
            default_max_tokens=int(params["default_max_new_tokens"]),
            max_tokens_limit=int(params["max_new_tokens_limit"]),
            max_positions=int(params.get("max_positions") or 0),
        )
    first = steps[0]  # the tokenizer step, or the python backend's one hop
    config = read_config(repository / first / "config.pbtxt")
    params = parameters(config)
    return Deployment(
        name=name,
        task=task,
        target=name,
        inputs=frozenset(t.name for t in ensemble.input),
        models=(name, *steps),
        tokenizer=load_tokenizer(version_folder(repository / first, config) / "tokenizer.json"),
        max_batch=ensemble.max_batch_size,
        max_seq=int(params["max_seq"]),
        created=created,
    )


class Repository:
    """The deployments in a repository folder, read again when its configs change."""

    def __init__(self, path: Path, log=print) -> None:
        self.path, self.log = Path(path), log
        self._signature: tuple = ()
        self._deployments: dict[str, Deployment] = {}
        self._checked = 0.0

    def _configs(self) -> list[Path]:
        return sorted(self.path.glob("*/config.pbtxt"))

    def deployments(self) -> dict[str, Deployment]:
        now = time.monotonic()
        if now - self._checked < RESCAN_SECONDS and self._deployments:
            return self._deployments
        self._checked = now
        configs = self._configs()
        signature = tuple((str(p), p.stat().st_mtime_ns) for p in configs if p.exists())
        if signature != self._signature:
            self._signature, self._deployments = signature, self._scan(configs)
        return self._deployments

    def _scan(self, configs: list[Path]) -> dict[str, Deployment]:
        found = {}
        for path in configs:
            try:
                config = read_config(path)
                if config.platform != "ensemble" or "task" not in config.parameters:
                    continue
                found[config.name] = load(self.path, config)
            except Exception as err:  # a half-written or foreign model: skipped, said once
                self.log(f"openai api: skipping {path.parent.name}: {type(err).__name__}: {err}")
        return found
