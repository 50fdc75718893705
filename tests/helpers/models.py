"""Small real models and tokenizers the fixtures save: trained here, weights chosen or
seeded, loadable offline like any Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

MARKERS = ("zebra", "giraffe")  # the crafted QA model answers from the first to the second


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


def save_generation_model(target: Path, family: str, max_positions: int = 128) -> Path:
    """A tiny random model of a family, with weights spread enough to vary its greedy output."""
    import torch
    import transformers

    tokenizer = generation_tokenizer("seq2seq" if family == "t5" else "causal")
    if family == "llama":  # grouped-query attention, RoPE, position_ids; 1024 positions
        from tasks.bench_model import save_llama

        return save_llama(
            target, tokenizer, seed=3, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, initializer_range=0.3,
        )  # fmt: skip
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    common = {"vocab_size": vocab, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    config, model_class = {
        "gpt2": (
            transformers.GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=max_positions,
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
                max_position_embeddings=max_positions,
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


# A chat template of the ChatML kind, with what real ones use: the special tokens, a loop,
# raise_exception on a bad conversation, and the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_chat_model(target: Path) -> Path:
    """The tiny GPT-2 with a chat template (in its tokenizer_config.json, as the Hub has it)."""
    from transformers import AutoTokenizer

    save_generation_model(target, "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
    return target


def save_llama16(target: Path, max_positions: int) -> Path:
    """A tiny random Llama with heads of 16 values (GroupQueryAttention's least: decoder=slots)
    on the causal tokenizer trained here."""
    from tasks.bench_model import save_llama

    return save_llama(
        target, generation_tokenizer("causal"), seed=0, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, initializer_range=0.3,
    )  # fmt: skip


# The crafted NER model's words (MiniLM's uncased vocabulary) and the label each one takes.
NER_WORDS = {
    "ann": "B-PER",
    "smith": "I-PER",
    "google": "B-ORG",
    "united": "B-ORG",
    "nations": "I-ORG",
    "paris": "B-LOC",
    "new": "B-LOC",
    "york": "I-LOC",
    "french": "B-MISC",
    "olympics": "I-MISC",
}
NER_LABELS = ("O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")


def save_ner_model(target: Path, tokenizer_dir: Path) -> Path:
    """A tiny BertForTokenClassification on MiniLM's real tokenizer that finds entities.

    Seeded random weights, except that each word of NER_WORDS owns an axis of its embedding
    which the classifier reads as its label, and "O" has a bias: those words get their label
    with a probability that the position and the random weights move, other tokens get "O".
    dslim/bert-base-NER's labels and order."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        id2label=dict(enumerate(NER_LABELS)),
        label2id={label: i for i, label in enumerate(NER_LABELS)},
    )
    torch.manual_seed(4)
    model = BertForTokenClassification(config)
    with torch.no_grad():
        words = model.bert.embeddings.word_embeddings.weight
        model.bert.embeddings.position_embeddings.weight.normal_(0, 0.25)  # scores vary
        model.classifier.weight.normal_(0, 0.05)
        model.classifier.bias.zero_()
        model.classifier.bias[0] = 4.0  # "O" unless a word's axis says otherwise
        for word, label in NER_WORDS.items():
            (token,) = tokenizer.convert_tokens_to_ids([word])
            assert token != tokenizer.unk_token_id, word
            axis = NER_LABELS.index(label)
            words[token] = 0
            words[token, axis] = 10.0
            model.classifier.weight[axis, axis] += 1.0
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(tokenizer_dir / name, target / name)
    return target


# A python-backend model of one FP32 vector in and out, for tests of the server itself.
PYTHON_MODEL_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
"""

IDENTITY_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
"""


def add_model(repo: Path, name: str, code: str) -> None:
    """A python-backend model; model.py is written before config.pbtxt, as the build does."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(code)
    (repo / name / "config.pbtxt").write_text(PYTHON_MODEL_CONFIG.format(name=name))


# Sizes of the tiny random decoders of any family (tiny_decoder_config): each set only where
# the family's config has the field. A window of 8 is passed by every parity prompt and its
# new tokens; layer_types alternate sliding and full layers where a family has both.
TINY_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"],
    "initializer_range": 0.3,
    # mixture of experts: 4 experts, 2 per token
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    # DeepSeek-style: one expert group, a dense first layer, small latent attention
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,  # = head_dim, which its rotary embedding takes
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # GPT-style names
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 128,
}


def tiny_decoder_config(model_type: str, tokenizer):
    """A tiny random config of any causal-LM family transformers knows."""
    import transformers

    defaults = transformers.AutoConfig.for_model(model_type).to_dict()
    sizes = {k: v for k, v in TINY_DECODER.items() if k in defaults}
    if defaults.get("layer_types") is None:
        sizes.pop("layer_types", None)
    elif "use_sliding_window" in defaults:  # qwen2, qwen3...: else the window is None, and
        sizes["use_sliding_window"] = True  # a sliding layer without one fails in forward
    if "kv_lora_rank" in defaults:  # latent attention (DeepSeek): a key per query head, as the
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]  # real configs have it
    eos = tokenizer.eos_token_id
    return transformers.AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def save_decoder_model(target: Path, model_type: str) -> Path:
    """A tiny random causal LM of any family, with a tokenizer trained here."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = generation_tokenizer("causal")
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(tiny_decoder_config(model_type, tokenizer)).save_pretrained(
        target
    )
    tokenizer.save_pretrained(target)
    return target
