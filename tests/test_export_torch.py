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
