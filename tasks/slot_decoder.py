"""Stage `slots` (decoder=slots): a CPU decoder for the in-flight loop whose cache is written
in place, one ONNX graph on ONNX Runtime's GroupQueryAttention (com.microsoft), built here
from a Llama-family checkpoint into model_zoo/<name>/onnx/decoder_slots.onnx, and its mixed
twin (below), each with its record (sha256). The parity stage proves their greedy tokens
equal generate() with rows joining the in-flight loop at different times; the generate and
stream models serve them in place of the exported parts (which TensorRT and decoder=inline or
models keep).

The graph takes `input_ids` [rows, positions] (a prompt, right-padded, or one token a row),
`attention_mask` [rows, total] (a row's ones count its tokens, this call's included; only the
count matters) and `past_key_values.N.key/value` [rows, kv heads, buffer, head size], and
gives `logits` [rows, 1, vocab] of each row's last token and `present.N.key/value`. Bound to
the same buffer as the past (IOBinding), present is written in place: each row's new keys
and values at its own length, its attention over its own length only. So no cache is copied
at a step, a row that leaves is one slot freed, and no step reads a cache padded to its
longest row (triton/inflight/batch.py `SlotGroup`).

A second graph, decoder_slots_mixed.onnx (`mixed`), steps the running rows and prefills the
joining prompts in one call, as Orca's selective batching does: every real token, packed
(`input_ids` [tokens]: each running row's one, then the prompts' without their padding), goes
through the projections and the MLP once, and only attention sees rows: the running rows'
(`attention_mask`, `past_key_values.*`, slots 0..) and the prompts', right-padded
(`prompt_mask`, `prompt_past_key_values.*`, the slots after), two GroupQueryAttention calls a
layer (its CPU kernel takes a prompt after a cache only one row at a time).
`prompt_cells` [prompts, positions] places the packed tokens in the prompts' grid,
`prompt_order` takes the real ones back and `last` [all rows] picks each row's last token.
A call of a step and a prefill then reads the weights once, not twice: 16 rows and a prompt
of 22 tokens took 15.6 ms against 17.3 as two calls, and the in-flight loop at 16 clients
made a tenth more tokens/s (AMD EPYC, 2 cores). A call with no running row or no prompt
takes the first graph (the kernel fails on an empty batch), so the weights are held twice.

Rotary positions come from the checkpoint's own rotary embedding (its rope scaling
included): cos and sin caches over the model's positions. Imports torch, transformers and
onnx when called.
"""

from __future__ import annotations

from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, exporters, paths, profiles
from tasks.errors import ExportError, fails_cleanly
from tasks.facts import checkpoint_facts
from tasks.settings import Settings, current

# Model types whose decoder layer this graph is: RMSNorm, q/k/v/o projections (Qwen2's with
# biases), RoPE, SwiGLU MLP; grouped-query attention or not.
SLOT_MODEL_TYPES = ("llama", "mistral", "qwen2")
OPSET, MS_OPSET = 17, 1
PROMPT = "prompt_"  # the mixed graph's joining rows: their cache inputs and outputs


class SlotDecoderError(ValueError):
    """The checkpoint is not one this graph can be built for; the message names why."""


def check(config, longest: int | None = None) -> None:
    """Refuse a checkpoint this graph is not (SlotDecoderError, the reason in words); `longest`:
    the most positions a row of the deployment holds (a sliding window past it never acts)."""
    if config.model_type not in SLOT_MODEL_TYPES:
        raise SlotDecoderError(
            f"model type {config.model_type!r} has no slot decoder (only {SLOT_MODEL_TYPES})"
        )
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise SlotDecoderError("the slot decoder's MLP is SwiGLU without bias")
    if getattr(config, "attention_bias", False):  # Qwen2's q, k, v biases it builds; no others
        raise SlotDecoderError("attention projections with biases (attention_bias) are not built")
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head % 16:  # GroupQueryAttention's CPU kernel
        raise SlotDecoderError(
            f"a head of {head} values: GroupQueryAttention takes multiples of 16"
        )
    window = getattr(config, "sliding_window", None)
    reach = longest or config.max_position_embeddings
    if window and getattr(config, "use_sliding_window", True) and window < reach:
        raise SlotDecoderError(
            f"a sliding window of {window} positions is not built (rows here reach {reach})"
        )


def build(
    source: Path, target: Path, longest: int | None = None, mixed: Path | None = None
) -> None:
    """Write the graph of the checkpoint in `source` to `target` and, when given, its mixed
    twin to `mixed` (see module doc), the checkpoint loaded once; `longest`, as `check`
    takes it."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config = model.config
    check(config, longest)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // heads
    positions = config.max_position_embeddings
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    vocab = config.vocab_size
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(positions)[None])

    def write(path: Path, mixed: bool) -> None:
        """One graph: the step's, or (`mixed`) its twin's (see module doc)."""
        initializers, nodes = [], []

        def weight(name: str, array) -> str:
            initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
            return name

        def node(op: str, inputs: list, output: str, domain: str = "", **attributes) -> str:
            nodes.append(
                helper.make_node(op, inputs, [output], output, domain=domain, **attributes)
            )
            return output

        def norm(x: str, name: str, output: str) -> str:
            scale = weight(f"{output}.weight", weights[name])
            eps = float(config.rms_norm_eps)
            return node("SimplifiedLayerNormalization", [x, scale], output, epsilon=eps, axis=-1)

        half = cos.shape[-1] // 2
        weight("cos_cache", cos[0, :, :half].numpy())
        weight("sin_cache", sin[0, :, :half].numpy())
        weight("one", np.array([1], np.int64))
        weight("one_scalar", np.array(1, np.int64))
        floats, ints = TensorProto.FLOAT, TensorProto.INT64

        def lengths_of(mask: str, prefix: str) -> tuple[str, str]:
            """GroupQueryAttention's seqlens_k (each row's ones less one) and total length."""
            node("ReduceSum", [mask, "one"], f"{prefix}mask_sum", keepdims=0)
            lengths = node("Sub", [f"{prefix}mask_sum", "one_scalar"], f"{prefix}lengths_less_one")
            node("Cast", [lengths], f"{prefix}seqlens_k", to=TensorProto.INT32)
            node("Shape", [mask], f"{prefix}mask_shape")
            node("Gather", [f"{prefix}mask_shape", "one_scalar"], f"{prefix}total", axis=0)
            node("Cast", [f"{prefix}total"], f"{prefix}total_sequence_length", to=TensorProto.INT32)
            return f"{prefix}seqlens_k", f"{prefix}total_sequence_length"

        def attention(qkv: str, i: int, prefix: str, lengths: tuple[str, str]) -> str:
            past, present = f"{prefix}past_key_values.{i}.", f"{prefix}present.{i}."
            nodes.append(
                helper.make_node(
                    "GroupQueryAttention",
                    [qkv, "", "", past + "key", past + "value", *lengths, "cos_cache", "sin_cache"],
                    [f"l{i}.{prefix}attn", present + "key", present + "value"],
                    f"l{i}.{prefix}gqa",
                    domain="com.microsoft",
                    num_heads=heads,
                    kv_num_heads=kv_heads,
                    scale=float(head**-0.5),
                    do_rotary=1,
                    rotary_interleaved=0,
                    local_window_size=-1,
                )
            )
            return f"l{i}.{prefix}attn"

        inputs, outputs = [], [helper.make_tensor_value_info("logits", floats, ["rows", 1, vocab])]

        def cache_io(prefix: str) -> None:
            for i in range(config.num_hidden_layers):
                for kind in ("key", "value"):
                    for name, into in (("past_key_values", inputs), ("present", outputs)):
                        tensor = f"{prefix}{name}.{i}.{kind}"
                        shape = ["prompts" if prefix else "rows", kv_heads, "buffer", head]
                        into.append(helper.make_tensor_value_info(tensor, floats, shape))

        if not mixed:
            # rows [rows, positions]: each row's length less one and the longest
            inputs += [
                helper.make_tensor_value_info("input_ids", ints, ["rows", "positions"]),
                helper.make_tensor_value_info("attention_mask", ints, ["rows", "total"]),
            ]
            lengths = lengths_of("attention_mask", "")

            def layer_attention(qkv: str, i: int) -> str:
                return attention(qkv, i, "", lengths)

        else:
            # tokens [tokens]: the stepping rows' one each, then the joining prompts' (see doc)
            inputs += [
                helper.make_tensor_value_info("input_ids", ints, ["tokens"]),
                helper.make_tensor_value_info("attention_mask", ints, ["rows", "total"]),
                helper.make_tensor_value_info("prompt_mask", ints, ["prompts", "positions"]),
                helper.make_tensor_value_info("prompt_cells", ints, ["prompts", "positions"]),
                helper.make_tensor_value_info("prompt_order", ints, ["prompt_tokens"]),
                helper.make_tensor_value_info("last", ints, ["all_rows"]),
            ]
            outputs[0] = helper.make_tensor_value_info("logits", floats, ["all_rows", 1, vocab])
            stepping, prompting = (
                lengths_of("attention_mask", ""),
                lengths_of("prompt_mask", PROMPT),
            )
            weight("zero", np.array([0], np.int64))
            weight("flat", np.array([-1, heads * head], np.int64))
            node("Shape", ["attention_mask"], "rows_shape")
            node("Slice", ["rows_shape", "zero", "one"], "rows_count")

            def layer_attention(qkv: str, i: int) -> str:
                rows = node("Slice", [qkv, "zero", "rows_count", "zero"], f"l{i}.step_qkv")
                rows = attention(
                    node("Unsqueeze", [rows, "one"], f"l{i}.step_qkv3"), i, "", stepping
                )
                rows = node("Reshape", [rows, "flat"], f"l{i}.step_attn")
                grid = node("Gather", [qkv, "prompt_cells"], f"l{i}.prompt_qkv", axis=0)
                grid = node(
                    "Reshape", [attention(grid, i, PROMPT, prompting), "flat"], f"l{i}.grid"
                )
                prompts = node("Gather", [grid, "prompt_order"], f"l{i}.prompt_packed", axis=0)
                return node("Concat", [rows, prompts], f"l{i}.attn_all", axis=0)

        for prefix in ("", PROMPT) if mixed else ("",):
            cache_io(prefix)
        embed = weight("embed", weights["model.embed_tokens.weight"])
        x = node("Gather", [embed, "input_ids"], "h0")
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            normed = norm(x, p + "input_layernorm.weight", f"l{i}.attn_norm")
            qkv_weight = np.concatenate([weights[p + f"self_attn.{k}_proj.weight"] for k in "qkv"])
            qkv = node("MatMul", [normed, weight(f"l{i}.qkv", qkv_weight.T)], f"l{i}.qkv_out")
            if p + "self_attn.q_proj.bias" in weights:
                bias = np.concatenate([weights[p + f"self_attn.{k}_proj.bias"] for k in "qkv"])
                qkv = node("Add", [qkv, weight(f"l{i}.qkv_bias", bias)], f"l{i}.qkv_biased")
            o_weight = weight(f"l{i}.o", weights[p + "self_attn.o_proj.weight"].T)
            attended = node("MatMul", [layer_attention(qkv, i), o_weight], f"l{i}.o_out")
            h = node("Add", [x, attended], f"l{i}.h")
            normed = norm(h, p + "post_attention_layernorm.weight", f"l{i}.mlp_norm")
            gate = node(
                "MatMul",
                [normed, weight(f"l{i}.gate", weights[p + "mlp.gate_proj.weight"].T)],
                f"l{i}.gate_out",
            )
            up = node(
                "MatMul",
                [normed, weight(f"l{i}.up", weights[p + "mlp.up_proj.weight"].T)],
                f"l{i}.up_out",
            )
            silu = node("Mul", [gate, node("Sigmoid", [gate], f"l{i}.sigmoid")], f"l{i}.silu")
            down_weight = weight(f"l{i}.down", weights[p + "mlp.down_proj.weight"].T)
            down = node(
                "MatMul", [node("Mul", [silu, up], f"l{i}.swiglu"), down_weight], f"l{i}.down_out"
            )
            x = node("Add", [h, down], f"l{i}.out")
        if not mixed:
            # each row's last token: min(its length less one, positions less one) (a step: 0)
            node("Shape", ["input_ids"], "ids_shape")
            node("Gather", ["ids_shape", "one_scalar"], "positions")
            node("Sub", ["positions", "one_scalar"], "last_position")
            node("Min", ["lengths_less_one", "last_position"], "last")
            node("Unsqueeze", ["last", "one"], "last_index")
            node("GatherND", [x, "last_index"], "last_hidden", batch_dims=1)
            node("Unsqueeze", ["last_hidden", "one"], "last_hidden_3d")
        else:  # each row's last token, packed
            last = node("Gather", [x, "last"], "last_hidden", axis=0)
            node("Unsqueeze", [last, "one"], "last_hidden_3d")
        final = norm("last_hidden_3d", "model.norm.weight", "final_norm")
        node("MatMul", [final, weight("lm_head", weights["lm_head.weight"].T)], "logits")
        graph = helper.make_graph(nodes, "slot_decoder", inputs, outputs, initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)]
        onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))

    write(target, False)
    if mixed is not None:
        write(mixed, True)


def install(settings: Settings) -> None:
    """Build the deployment's two graphs (the step's and its mixed twin's) and write them,
    then their records."""
    from transformers import AutoConfig

    name = settings.name
    source = paths.source_dir(name)
    facts = checkpoint_facts(name)
    try:  # a row holds at most the profile's longest cache and its token
        longest = profiles.slot_positions(settings, facts["max_positions"])
        check(AutoConfig.from_pretrained(source, local_files_only=True), longest)
    except SlotDecoderError as err:
        raise ExportError(f"decoder=slots: {err}; use decoder=inline") from None
    if exporters.external_data(source):
        raise ExportError(
            "decoder=slots: the checkpoint's fp32 weights pass 2 GiB, which one ONNX file does "
            "not hold and this graph does not write beside it yet; use decoder=inline"
        )
    (graph, record), (mixed, mixed_record) = paths.slot_decoder_files(name)
    for record_file in (record, mixed_record):
        record_file.unlink(missing_ok=True)  # the records come back last
    shown = [path.relative_to(paths.ROOT) for path in (graph, mixed)]
    print(f"slots: building {shown[0]} and {shown[1].name} (GroupQueryAttention)", flush=True)
    with artifacts.atomic_target(graph) as staged, artifacts.atomic_target(mixed) as staged_mixed:
        build(source, staged, longest, mixed=staged_mixed)
    for path, record_file in ((graph, record), (mixed, mixed_record)):
        artifacts.write_json(record_file, {**artifacts.onnx_record(path), "opset": OPSET})
        print(f"slots: {path.relative_to(paths.ROOT)} ({path.stat().st_size / 2**20:.1f} MiB)")


def task_slots():
    """decoder=slots: the causal LM as a graph whose cache is written in place, and its twin
    that also prefills joining prompts in the running rows' step."""
    settings = current()
    if settings.decoder != "slots":
        return
    name = settings.name
    graphs = paths.slot_decoder_files(name)
    params = {
        "shapes": settings.shape_points(),  # the longest row, against a sliding window
        "opsets": [OPSET, MS_OPSET],
        "model_types": SLOT_MODEL_TYPES,
        "versions": artifacts.versions("onnx", "transformers", "torch"),
    }
    yield {
        "name": name,
        "actions": [(fails_cleanly(install), [settings])],
        "file_dep": [
            paths.source_manifest(name),
            paths.stage_module("slot_decoder"),
            paths.stage_module("facts"),
            paths.stage_module("profiles"),  # the longest row, against a sliding window
            paths.stage_module("exporters"),  # the weights' size
        ],
        "targets": [path for graph in graphs for path in graph],
        "uptodate": [
            config_changed(params),
            *(artifacts.file_matches_record(target, record) for target, record in graphs),
        ],
        "clean": [(artifacts.remove_artifacts, [[path for graph in graphs for path in graph]])],
    }
