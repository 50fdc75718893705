"""The generic exporter's pieces that need no export: which path a model type takes, the
fixed-loop mixture-of-experts forward against transformers' own, the coverage table."""

from __future__ import annotations

import pytest

from tasks import catalog, exporters, paths
from tasks.errors import ModelSourceError

CAUSAL = catalog.TASKS["causallm"]


@pytest.mark.parametrize(
    ("model_type", "exporter", "path"),
    [
        ("llama", "auto", "optimum"),
        ("gpt2", "auto", "optimum"),
        ("starcoder2", "auto", "torch"),
        ("mixtral", "auto", "torch"),
        ("llama", "torch", "torch"),
        ("llama", "optimum", "optimum"),
        ("gemma3_text", "auto", "torch"),  # optimum lists it, but its files failed parity
        ("gemma3_text", "optimum", "optimum"),
    ],
)
def test_auto_takes_optimum_where_it_lists_the_type_else_torch(model_type, exporter, path):
    choice = exporters.choose(CAUSAL, model_type, exporter)
    assert choice.path == path
    assert model_type in choice.reason or exporter == "torch"


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"model_type": "mistral", "sliding_window": 8, "max_position_embeddings": 128}, "torch"),
        ({"model_type": "mistral", "sliding_window": 4096}, "torch"),  # no positions: unbounded
        ({"model_type": "mistral", "sliding_window": None}, "optimum"),  # Mistral v0.2 on
        ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 4096},
         "optimum"),  # the window never bites
        ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": False}, "optimum"),
        ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True,
          "layer_types": ["sliding_attention", "full_attention"]}, "torch"),
        ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True,
          "layer_types": ["full_attention", "full_attention"]}, "optimum"),
    ],
)  # fmt: skip
def test_auto_takes_torch_where_a_sliding_window_bites_which_optimums_files_do_not_keep(
    config, path
):
    """A tiny Mistral and Qwen2 with a window of 8 failed parity on optimum's files
    (transformers' cache keeps the window, the files every position), and pass on torch's
    (test_decoders serves them)."""
    choice = exporters.choose(CAUSAL, config["model_type"], "auto", config)
    assert choice.path == path, choice
    if path == "torch":
        assert "sliding window of" in choice.reason and "do not keep it" in choice.reason
    assert exporters.choose(CAUSAL, config["model_type"], "optimum", config).path == "optimum"


@pytest.mark.parametrize("model_type", ["mamba", "jamba", "bamba", "falcon_h1", "lfm2", "gemma3n"])
def test_caches_that_are_not_key_value_pairs_are_refused_with_the_reason(model_type):
    with pytest.raises(ModelSourceError, match=catalog.UNSUPPORTED_CACHES[model_type][:20]):
        exporters.choose(CAUSAL, model_type, "auto")


def test_a_type_the_generic_path_cannot_export_is_refused_with_the_cause():
    with pytest.raises(ModelSourceError, match="complex numbers"):
        exporters.choose(CAUSAL, "deepseek_v2", "auto")


def test_an_encoder_task_keeps_optimum_and_its_hint():
    with pytest.raises(ModelSourceError, match="cannot be exported for question-answering"):
        exporters.choose(catalog.TASKS["qa"], "starcoder2", "auto")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_the_fixed_loop_moe_blocks_equal_transformers_sparse_loop(decoder_models, model_type):
    """Both kinds of MOE_BLOCKS row: the whole forward (mixtral, qwen2_moe with its shared
    expert), or only the expert loop under the family's own routing (deepseek_v3)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.export_torch import MOE_BLOCKS, patch_moe_blocks

    model = AutoModelForCausalLM.from_pretrained(decoder_models(model_type)).eval()
    blocks = [m for m in model.modules() if type(m).__name__ in MOE_BLOCKS]
    assert blocks
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, model.config.hidden_size)
    with torch.inference_mode():
        theirs = [block(hidden) for block in blocks]
        assert patch_moe_blocks(model) == len(blocks)
        mine = [block(hidden) for block in blocks]
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("transposed", [False, True], ids=["out-by-in", "in-by-out"])
def test_the_fused_experts_loop_sums_as_the_experts_it_was_made_of(decoder_models, transposed):
    """transformers 5's layout (one module of 3D weights, read by its flags), made here from
    4.57's mixtral experts: the fixed loop over it equals the loop over those experts."""
    import types

    import torch
    from transformers import AutoModelForCausalLM

    from tasks.export_torch import every_expert, every_fused_expert, is_fused_experts

    model = AutoModelForCausalLM.from_pretrained(decoder_models("mixtral")).eval()
    block = next(m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock")
    if is_fused_experts(block.experts):
        pytest.skip("transformers 5: the MoE test above runs its own fused experts")
    experts = block.experts
    gate_up = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts])
    down = torch.stack([e.w2.weight for e in experts])
    act = experts[0].act_fn
    fused = types.SimpleNamespace(
        num_experts=len(experts),
        has_gate=True,
        has_bias=False,
        is_transposed=transposed,
        gate_up_proj=gate_up.transpose(1, 2) if transposed else gate_up,
        down_proj=down.transpose(1, 2) if transposed else down,
        _apply_gate=lambda x: act(x.chunk(2, dim=-1)[0]) * x.chunk(2, dim=-1)[1],
    )
    torch.manual_seed(0)
    tokens = torch.randn(7, model.config.hidden_size)
    weights, indices = torch.topk(torch.softmax(torch.randn(7, len(experts)), dim=-1), 2)
    dense = torch.zeros(7, len(experts)).scatter(1, indices, weights)
    with torch.inference_mode():
        mine = every_fused_expert(fused, tokens, indices, weights)
        theirs = every_expert(experts, tokens, dense)
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_the_decoders_table_is_what_the_command_makes():
    from tasks.decoders import decoders_table

    assert paths.DECODERS_DOC.read_text() == decoders_table(), (
        "docs/decoders.md is stale: run `python -m tasks.decoders`"
    )


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_the_bench_times_the_fixed_loop_against_top_k_routing(decoder_models, model_type):
    """What `doit bench` reports as moe_dense_vs_topk, on the checkpoint's own block (the
    figures' values are the machine's: only that they are there)."""
    from tasks.moe_bench import block_cost, report_line

    found = block_cost(decoder_models(model_type), tokens=(1, 16))
    assert found["experts"] == 4 and found["top_k"] == 2 and found["expert_flops_ratio"] == 2
    assert [p["tokens"] for p in found["points"]] == [1, 16]
    for point in found["points"]:
        assert point["topk_ms"] > 0 and point["fixed_loop_ms"] > 0 and point["ratio"] > 0
    assert "x at 16 tokens" in report_line(found)


def test_a_dense_decoder_has_no_moe_cost(decoder_models):
    from tasks.moe_bench import block_cost

    assert block_cost(decoder_models("llama")) is None


def eager_forms() -> dict:
    """transformers' eager attention in each form the grouped one follows: llama's (most
    families), Gemma 2's (soft-capping, default scaling), gpt-oss's (a sink logit per head)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama

    return {"llama": (llama, {}), "gemma2": (gemma2, {"softcap": 0.5}), "gpt_oss": (gpt_oss, {})}


@pytest.mark.parametrize("form", ["llama", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("length", [1, 3], ids=["decode", "prompt"])
def test_grouped_query_attention_gives_what_eager_gives(form, length):
    """The same outputs, key/value heads not repeated: scaling, soft-capping, sinks, and a
    mask with a left-padded row and causal rows."""
    import types

    import torch

    from tasks.export_torch import grouped_query_attention

    eager, extra = eager_forms()[form]
    torch.manual_seed(0)
    batch, heads, kv_heads, width, past = 2, 8, 2, 16, 5
    total = past + length
    module = types.SimpleNamespace(
        num_key_value_groups=heads // kv_heads, head_dim=width, training=False
    )
    if form == "gpt_oss":
        module.sinks = torch.randn(heads)
    query = torch.randn(batch, heads, length, width)
    key, value = torch.randn(2, batch, kv_heads, total, width)
    allowed = torch.ones(batch, 1, length, total, dtype=torch.bool).tril(past)
    allowed[0, :, :, :2] = False  # a left-padded row
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    scaling = 0.3 if form != "gemma2" else None  # Gemma 2's default: head_dim ** -0.5
    theirs = eager(module, query, key, value, mask, scaling=scaling, **extra)
    mine = grouped_query_attention(module, query, key, value, mask, scaling=scaling, **extra)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "taken"),
    [
        ("llama", "grouped-query attention (4 query heads on 2 key/value heads"),
        ("qwen2_moe", "not go through transformers' attention interface"),
    ],
)
def test_the_export_takes_grouped_attention_where_it_gives_eager(decoder_models, model_type, taken):
    """Measured on the model: llama's attention takes it; qwen2_moe's (4.57) calls its own
    eager, not the interface, and stays eager, saying why."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.export_torch import GROUPED_ATTENTION, choose_attention, takes

    model = AutoModelForCausalLM.from_pretrained(
        decoder_models(model_type), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    said = choose_attention(model, model.config.num_hidden_layers, takes(model, "position_ids"))
    if model_type == "qwen2_moe" and said.startswith("grouped"):
        pytest.skip("this transformers' qwen2_moe goes through the attention interface (5.x)")
    assert taken in said
    grouped = model.config._attn_implementation == GROUPED_ATTENTION
    assert grouped == taken.startswith("grouped")
