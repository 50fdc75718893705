"""Stage `bench_model`: the generation benchmark's model, made here, offline.

A random Llama-family decoder of the shape LLM serving is measured on in the README
(catalog.BENCH_MODEL: 512 wide, 8 layers, 8 query heads sharing 2 key/value heads, RoPE,
SwiGLU: about 23M parameters), seeded, with a byte-level BPE tokenizer trained on the spot
on the catalog's texts. Anyone can re-run the figures:

    doit bench_model
    doit task=causallm model=model_zoo/bench-llama/model name=llama
    doit bench task=causallm model=model_zoo/bench-llama/model name=llama concurrency=1,4,16

The weights are made in a child process (`python -m tasks.bench_model DIR`): torch and
transformers stay out of `doit list`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, catalog, paths


def byte_level_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's alphabet: every byte has a token) trained on `texts`, as a
    transformers fast tokenizer whose one special token is BOS, EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special,
        eos_token=special,
        pad_token=special,
        model_input_names=["input_ids", "attention_mask"],
    )


def save_llama(target: Path, tokenizer, seed: int = 0, **sizes) -> Path:
    """A random LlamaForCausalLM of `sizes` (LlamaConfig's names) and its tokenizer, saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    token = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=token,
        eos_token_id=token,
        pad_token_id=token,
        **sizes,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def make(target: Path) -> None:
    texts = list(catalog.SAMPLE_TEXTS + catalog.SAMPLE_QUESTIONS + catalog.GENERATION_PROMPTS)
    spec = dict(catalog.BENCH_MODEL)
    tokenizer = byte_level_tokenizer(texts * 4, spec.pop("vocab_size"))
    staging = target.with_name(target.name + ".partial")  # renamed whole: never half a model
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    save_llama(staging, tokenizer, **spec)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)
    print(f"bench_model: {target.relative_to(paths.ROOT)} ({spec})", flush=True)


def task_bench_model():
    """The benchmark's random Llama-family model (512 wide, 8 layers, GQA), made offline."""
    target = paths.bench_model_dir()
    command = f"{sys.executable} -m tasks.bench_model {target}"
    return {
        "actions": [command],
        "file_dep": [paths.stage_module("bench_model")],
        "targets": [target / "config.json", target / "tokenizer.json"],
        "uptodate": [config_changed({"model": catalog.BENCH_MODEL})],
        "clean": [(artifacts.remove_artifacts, [[target / "config.json"]])],
    }


if __name__ == "__main__":
    make(Path(sys.argv[1]))
