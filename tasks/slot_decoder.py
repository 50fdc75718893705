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


class _Graph:
    """One graph being written from a checkpoint's weights (`source`: its config, its state
    dict as numpy arrays, its rotary cos and sin): the pieces both graphs share."""

    def __init__(self, source: dict) -> None:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        self.np, self.helper, self.numpy_helper = np, helper, numpy_helper
        self.floats, self.ints, self.int32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
        self.config, self.weights = source["config"], source["weights"]
        config = self.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.initializers, self.nodes, self.inputs = [], [], []
        self.outputs = [self.value("logits", self.floats, ["rows", 1, config.vocab_size])]
        half = source["cos"].shape[-1] // 2
        self.weight("cos_cache", source["cos"][0, :, :half].numpy())
        self.weight("sin_cache", source["sin"][0, :, :half].numpy())
        self.weight("one", np.array([1], np.int64))
        self.weight("one_scalar", np.array(1, np.int64))

    def value(self, name: str, kind: int, shape: list):
        return self.helper.make_tensor_value_info(name, kind, shape)

    def weight(self, name: str, array) -> str:
        self.initializers.append(
            self.numpy_helper.from_array(self.np.ascontiguousarray(array), name)
        )
        return name

    def node(self, op: str, inputs: list, output: str, domain: str = "", **attributes) -> str:
        self.nodes.append(
            self.helper.make_node(op, inputs, [output], output, domain=domain, **attributes)
        )
        return output

    def norm(self, x: str, name: str, output: str) -> str:
        scale = self.weight(f"{output}.weight", self.weights[name])
        eps = float(self.config.rms_norm_eps)
        return self.node("SimplifiedLayerNormalization", [x, scale], output, epsilon=eps, axis=-1)

    def lengths(self, mask: str, prefix: str) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (each row's ones less one) and total length."""
        node = self.node
        node("ReduceSum", [mask, "one"], f"{prefix}mask_sum", keepdims=0)
        lengths = node("Sub", [f"{prefix}mask_sum", "one_scalar"], f"{prefix}lengths_less_one")
        node("Cast", [lengths], f"{prefix}seqlens_k", to=self.int32)
        node("Shape", [mask], f"{prefix}mask_shape")
        node("Gather", [f"{prefix}mask_shape", "one_scalar"], f"{prefix}total", axis=0)
        node("Cast", [f"{prefix}total"], f"{prefix}total_sequence_length", to=self.int32)
        return f"{prefix}seqlens_k", f"{prefix}total_sequence_length"

    def attention(self, qkv: str, i: int, prefix: str, lengths: tuple[str, str]) -> str:
        """Layer i's GroupQueryAttention over the cache `prefix` names (its rows' slots)."""
        past, present = f"{prefix}past_key_values.{i}.", f"{prefix}present.{i}."
        self.nodes.append(
            self.helper.make_node(
                "GroupQueryAttention",
                [qkv, "", "", past + "key", past + "value", *lengths, "cos_cache", "sin_cache"],
                [f"l{i}.{prefix}attn", present + "key", present + "value"],
                f"l{i}.{prefix}gqa",
                domain="com.microsoft",
                num_heads=self.heads,
                kv_num_heads=self.kv_heads,
                scale=float(self.head**-0.5),
                do_rotary=1,
                rotary_interleaved=0,
                local_window_size=-1,
            )
        )
        return f"l{i}.{prefix}attn"

    def cache(self, prefix: str) -> None:
        """The cache's inputs and outputs, every layer's, for the rows `prefix` names."""
        for i in range(self.config.num_hidden_layers):
            for kind in ("key", "value"):
                for name, into in (("past_key_values", self.inputs), ("present", self.outputs)):
                    shape = ["prompts" if prefix else "rows", self.kv_heads, "buffer", self.head]
                    into.append(self.value(f"{prefix}{name}.{i}.{kind}", self.floats, shape))

    def decoder(self, attention) -> str:
        """The embedding and every layer (`attention(qkv, i)` gives layer i's): the last
        hidden states."""
        weights, node, weight = self.weights, self.node, self.weight
        x = node(
            "Gather", [weight("embed", weights["model.embed_tokens.weight"]), "input_ids"], "h0"
        )
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            normed = self.norm(x, p + "input_layernorm.weight", f"l{i}.attn_norm")
            qkv_weight = self.np.concatenate(
                [weights[p + f"self_attn.{k}_proj.weight"] for k in "qkv"]
            )
            qkv = node("MatMul", [normed, weight(f"l{i}.qkv", qkv_weight.T)], f"l{i}.qkv_out")
            if p + "self_attn.q_proj.bias" in weights:
                bias = self.np.concatenate([weights[p + f"self_attn.{k}_proj.bias"] for k in "qkv"])
                qkv = node("Add", [qkv, weight(f"l{i}.qkv_bias", bias)], f"l{i}.qkv_biased")
            o_weight = weight(f"l{i}.o", weights[p + "self_attn.o_proj.weight"].T)
            attended = node("MatMul", [attention(qkv, i), o_weight], f"l{i}.o_out")
            h = node("Add", [x, attended], f"l{i}.h")
            normed = self.norm(h, p + "post_attention_layernorm.weight", f"l{i}.mlp_norm")
            gate_weight = weight(f"l{i}.gate", weights[p + "mlp.gate_proj.weight"].T)
            gate = node("MatMul", [normed, gate_weight], f"l{i}.gate_out")
            up_weight = weight(f"l{i}.up", weights[p + "mlp.up_proj.weight"].T)
            up = node("MatMul", [normed, up_weight], f"l{i}.up_out")
            silu = node("Mul", [gate, node("Sigmoid", [gate], f"l{i}.sigmoid")], f"l{i}.silu")
            down_weight = weight(f"l{i}.down", weights[p + "mlp.down_proj.weight"].T)
            swiglu = node("Mul", [silu, up], f"l{i}.swiglu")
            x = node(
                "Add", [h, node("MatMul", [swiglu, down_weight], f"l{i}.down_out")], f"l{i}.out"
            )
        return x

    def save(self, last_hidden: str, path: Path) -> None:
        """The logits of `last_hidden` (each row's last token), then the graph, to `path`."""
        import onnx

        final = self.norm(last_hidden, "model.norm.weight", "final_norm")
        lm_head = self.weight("lm_head", self.weights["lm_head.weight"].T)
        self.node("MatMul", [final, lm_head], "logits")
        helper = self.helper
        graph = helper.make_graph(
            self.nodes, "slot_decoder", self.inputs, self.outputs, self.initializers
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)]
        onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))


def _step_graph(source: dict, path: Path) -> None:
    """The step's graph: rows [rows, positions], a prompt right-padded or a token a row."""
    g = _Graph(source)
    g.inputs += [
        g.value("input_ids", g.ints, ["rows", "positions"]),
        g.value("attention_mask", g.ints, ["rows", "total"]),
    ]
    lengths = g.lengths("attention_mask", "")
    g.cache("")
    x = g.decoder(lambda qkv, i: g.attention(qkv, i, "", lengths))
    # each row's last token: min(its length less one, positions less one) (a step: 0)
    g.node("Shape", ["input_ids"], "ids_shape")
    g.node("Gather", ["ids_shape", "one_scalar"], "positions")
    g.node("Sub", ["positions", "one_scalar"], "last_position")
    g.node("Min", ["lengths_less_one", "last_position"], "last")
    g.node("Unsqueeze", ["last", "one"], "last_index")
    g.node("GatherND", [x, "last_index"], "last_hidden", batch_dims=1)
    g.save(g.node("Unsqueeze", ["last_hidden", "one"], "last_hidden_3d"), path)


def _mixed_graph(source: dict, path: Path) -> None:
    """The twin: tokens [tokens], the running rows' one each, then the joining prompts' (see
    module doc)."""
    g = _Graph(source)
    g.inputs += [
        g.value("input_ids", g.ints, ["tokens"]),
        g.value("attention_mask", g.ints, ["rows", "total"]),
        g.value("prompt_mask", g.ints, ["prompts", "positions"]),
        g.value("prompt_cells", g.ints, ["prompts", "positions"]),
        g.value("prompt_order", g.ints, ["prompt_tokens"]),
        g.value("last", g.ints, ["all_rows"]),
    ]
    g.outputs[0] = g.value("logits", g.floats, ["all_rows", 1, g.config.vocab_size])
    stepping, prompting = g.lengths("attention_mask", ""), g.lengths("prompt_mask", PROMPT)
    g.weight("zero", g.np.array([0], g.np.int64))
    g.weight("flat", g.np.array([-1, g.heads * g.head], g.np.int64))
    g.node("Shape", ["attention_mask"], "rows_shape")
    g.node("Slice", ["rows_shape", "zero", "one"], "rows_count")
    g.cache("")
    g.cache(PROMPT)

    def attention(qkv: str, i: int) -> str:
        rows = g.node("Slice", [qkv, "zero", "rows_count", "zero"], f"l{i}.step_qkv")
        rows = g.node("Unsqueeze", [rows, "one"], f"l{i}.step_qkv3")
        rows = g.node("Reshape", [g.attention(rows, i, "", stepping), "flat"], f"l{i}.step_attn")
        grid = g.node("Gather", [qkv, "prompt_cells"], f"l{i}.prompt_qkv", axis=0)
        grid = g.attention(grid, i, PROMPT, prompting)
        grid = g.node("Reshape", [grid, "flat"], f"l{i}.grid")
        prompts = g.node("Gather", [grid, "prompt_order"], f"l{i}.prompt_packed", axis=0)
        return g.node("Concat", [rows, prompts], f"l{i}.attn_all", axis=0)

    last = g.node("Gather", [g.decoder(attention), "last"], "last_hidden", axis=0)
    g.save(g.node("Unsqueeze", [last, "one"], "last_hidden_3d"), path)


def build(
    source: Path, target: Path, longest: int | None = None, mixed: Path | None = None
) -> None:
    """Write the graph of the checkpoint in `source` to `target` and, when given, its mixed
    twin to `mixed` (see module doc), the checkpoint loaded once; `longest`, as `check`
    takes it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    check(model.config, longest)
    positions = model.config.max_position_embeddings
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(positions)[None])
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    made = {"config": model.config, "weights": weights, "cos": cos, "sin": sin}
    _step_graph(made, target)
    if mixed is not None:
        _mixed_graph(made, mixed)


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
