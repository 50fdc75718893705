"""The generic exporter: torch.onnx.export (dynamo) of any transformers decoder with a per-layer
key/value cache, for the model types optimum does not list (tasks/export.py calls it).

It writes what optimum's causal-LM export writes, so every later stage reads it unchanged:
`decoder_model` (the prompt, no past) and `decoder_with_past_model`, inputs `input_ids`,
`attention_mask`, `position_ids` (when the forward takes them), `past_key_values.{i}.key|value`,
outputs `logits` (the last position) and `present.{i}.key|value`, with optimum's axis names.

The wrapper takes the past as flat tensors and builds a transformers `DynamicCache` inside
`forward`; with no config that cache keeps every layer whole, sliding-window layers included
(their mask, not the cache, limits what they see), so the cache grows by one position per token
on every layer, as a full-attention model's does. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ExportError


@dataclass(frozen=True)
class MoeBlock:
    """How to read one of transformers' mixture-of-experts blocks (attribute names).

    Either the block keeps its own routing and only its `expert_loop` method, (tokens, top-k
    indices, top-k weights) -> mixed tokens, is replaced; or the whole forward is replaced,
    routing as transformers does it: softmax over `router`'s logits, the `top_k` largest,
    renormalised to sum to 1 when `normalize` says so ("always", or the name of a boolean
    attribute); then a `shared` expert for every token, scaled by sigmoid(`shared_gate`)."""

    router: str = "gate"
    experts: str = "experts"
    top_k: str = "top_k"
    normalize: str = "always"
    shared: str | None = None
    shared_gate: str | None = None
    expert_loop: str | None = None


# transformers' blocks loop over the experts the batch hit, a loop whose length is data, which
# torch.export cannot trace; during export each block below runs a fixed loop instead.
_OWN_ROUTING = MoeBlock(expert_loop="moe")
MOE_BLOCKS: dict[str, MoeBlock] = {
    "MixtralSparseMoeBlock": MoeBlock(),
    "Qwen2MoeSparseMoeBlock": MoeBlock(
        normalize="norm_topk_prob", shared="shared_expert", shared_gate="shared_expert_gate"
    ),
    "Qwen3MoeSparseMoeBlock": MoeBlock(normalize="norm_topk_prob"),
    "OlmoeSparseMoeBlock": MoeBlock(normalize="norm_topk_prob"),
    "FlexOlmoSparseMoeBlock": MoeBlock(normalize="norm_topk_prob"),
    "DeepseekV2MoE": _OWN_ROUTING,
    "DeepseekV3MoE": _OWN_ROUTING,
    "Dots1MoE": _OWN_ROUTING,
    "Glm4MoeMoE": _OWN_ROUTING,
    "LongcatFlashMoE": _OWN_ROUTING,
}


def every_expert(experts, tokens, weights):
    """Every expert on every token, weighted ([tokens, experts], zero outside a token's top k):
    the sparse loop's sums at num_experts / top_k times the experts' compute."""
    out = None
    for index, expert in enumerate(experts):
        term = expert(tokens) * weights[:, index : index + 1]
        out = term if out is None else out + term
    return out


def fixed_loop_experts(block, tokens, indices, weights):
    """A block's own `expert_loop` as a fixed loop (the block keeps its routing)."""
    import torch

    experts = getattr(block, MOE_BLOCKS[type(block).__name__].experts)
    dense = torch.zeros(tokens.shape[0], len(experts), dtype=weights.dtype, device=tokens.device)
    dense = dense.scatter(1, indices, weights)
    return every_expert(experts, tokens.to(weights.dtype), dense).type(tokens.dtype)


def fixed_loop_forward(block, hidden_states):
    """A mixture-of-experts block as one fixed graph, routing as transformers does."""
    import torch

    spec = MOE_BLOCKS[type(block).__name__]
    batch, sequence, width = hidden_states.shape
    tokens = hidden_states.reshape(-1, width)
    router_logits = getattr(block, spec.router)(tokens)
    probabilities = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    top, chosen = torch.topk(probabilities, getattr(block, spec.top_k), dim=-1)
    if spec.normalize == "always" or getattr(block, spec.normalize, False):
        top = top / top.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probabilities).scatter(1, chosen, top).to(tokens.dtype)
    out = every_expert(getattr(block, spec.experts), tokens, weights)
    if spec.shared:
        shared = getattr(block, spec.shared)(tokens)
        if spec.shared_gate:
            shared = torch.sigmoid(getattr(block, spec.shared_gate)(tokens)) * shared
        out = out + shared
    return out.reshape(batch, sequence, width), router_logits


def is_fused_experts(module) -> bool:
    """transformers 5 keeps a block's experts in one module of 3D weights whose forward takes
    (tokens, top-k indices, top-k weights) and routes nothing: the flags are what its
    `@use_experts_implementation` sets (4.57 has no such module)."""
    return all(hasattr(module, f) for f in ("num_experts", "has_gate", "has_bias", "is_transposed"))


def every_fused_expert(experts, tokens, indices, weights):
    """transformers 5's experts as a fixed loop: its `batched_mm` sums, reading the layout flags
    as it does, but each expert's weights applied to every token rather than gathered per
    token (a copy of two matrices per token and expert)."""
    import torch

    def linear(x, name: str, index: int):
        weight = getattr(experts, name)[index]
        out = x @ weight if experts.is_transposed else x @ weight.T
        return out + getattr(experts, f"{name}_bias")[index] if experts.has_bias else out

    count = experts.num_experts
    dense = torch.zeros(tokens.shape[0], count + 1, dtype=weights.dtype, device=tokens.device)
    dense = dense.scatter(1, indices, weights)[:, :count]  # index `count`: no expert (as eager)
    out = None
    for index in range(count):
        if experts.has_gate:
            hidden = experts._apply_gate(linear(tokens, "gate_up_proj", index))
        else:
            hidden = experts.act_fn(linear(tokens, "up_proj", index))
        hidden = linear(hidden, "down_proj", index)
        if getattr(experts, "has_post_expert_norm", False):
            hidden = experts.post_expert_norm(hidden)
        term = hidden * dense[:, index : index + 1]
        out = term if out is None else out + term
    return out.to(tokens.dtype)


def patch_moe_blocks(model) -> int:
    """Give each mixture-of-experts block of the model a fixed loop over its experts: the
    experts module's forward (transformers 5), else the block's by MOE_BLOCKS; how many."""
    import types

    patched = 0
    for module in model.modules():
        if is_fused_experts(module):  # the block keeps its own routing
            module.forward = types.MethodType(every_fused_expert, module)
            patched += 1
            continue
        spec = MOE_BLOCKS.get(type(module).__name__)
        if spec is None or is_fused_experts(getattr(module, spec.experts, None)):
            continue
        if spec.expert_loop:
            setattr(module, spec.expert_loop, types.MethodType(fixed_loop_experts, module))
        else:
            module.forward = types.MethodType(fixed_loop_forward, module)
        patched += 1
    return patched


# grouped-query attention is taken within this of eager's outputs on the same step, relative to
# each output's largest value (rounding only: the same products, summed in batches of rows)
GROUPED_ATTENTION_RTOL = 1e-5
# Our name for grouped_query_attention in transformers' attention interface (attn_implementation)
GROUPED_ATTENTION = "llm_in_triton_grouped_query"


def grouped_query_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' eager attention without repeating the key/value heads: the queries of a
    key/value head's group ride as extra rows ([batch, kv_heads, group * length, head_dim])
    against that head's keys and values, so a decoding step reads its cache once, where
    eager's `repeat_kv` copies it to every query head (Expand nodes in the graph). The steps
    are eager's: `scaling` (None: head_dim ** -0.5, as Gemma 2's), `softcap` (Gemma 2's
    logit soft-capping, before the mask), the additive mask, and gpt-oss's per-head sink
    logit (`module.sinks`: a column that takes part in the softmax, then is dropped). Other
    kwargs (`sliding_window`: the mask carries it) eager ignores too. Inference only."""
    import torch

    batch, heads, length, width = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if scaling is None:
        scaling = module.head_dim**-0.5
    grouped = query.reshape(batch, kv_heads, groups * length, width)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling
    if (softcap := kwargs.get("softcap")) is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, length, -1)  # rows: (group, position)
    if attention_mask is not None:  # [batch, 1, length, kv_length]: shared by every head
        scores = scores + attention_mask[:, :, None, :, : key.shape[-2]]
    sinks = getattr(module, "sinks", None)
    if sinks is None:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        column = sinks.reshape(1, kv_heads, groups, 1, 1).expand(batch, -1, -1, length, -1)
        logits = torch.cat([scores, column], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        weights = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    out = torch.matmul(weights.reshape(batch, kv_heads, groups * length, -1), value)
    out = out.reshape(batch, heads, length, -1).transpose(1, 2).contiguous()
    return out, weights.reshape(batch, heads, length, -1)


def register_grouped_attention() -> None:
    """Make GROUPED_ATTENTION a name transformers takes, with eager's masks."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, grouped_query_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, eager_mask)


def why_not_grouped(model, layers: int, positions: bool) -> str | None:
    """Why grouped_query_attention would not give what the family's eager attention gives on
    this model, or None: a step with a past and a left-padded row, its logits and cache within
    GROUPED_ATTENTION_RTOL of eager's. The model is left on grouped attention."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inputs = list(example_inputs(model, layers, positions, with_past=True))
    inputs[1] = inputs[1].clone()
    inputs[1][0, :2] = 0  # a left-padded row
    step = make_wrapper(model, layers, positions, with_past=True)
    calls = []

    def counted(module, *args, **kwargs):
        calls.append(module)
        return grouped_query_attention(module, *args, **kwargs)

    register_grouped_attention()
    ALL_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, counted)
    try:
        with torch.inference_mode():
            eager = step(*inputs)
            model.set_attn_implementation(GROUPED_ATTENTION)
            grouped = step(*inputs)
    finally:
        ALL_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, grouped_query_attention)
    if not calls:
        return "its attention does not go through transformers' attention interface"
    scale = [a.abs().max().clamp(min=1) for a in eager]
    differs = max(float((a - b).abs().max() / s) for a, b, s in zip(eager, grouped, scale))
    if differs > GROUPED_ATTENTION_RTOL:
        return f"it differs from the family's eager attention by {differs:.1e}"
    return None


def choose_attention(model, layers: int, positions: bool) -> str:
    """Put the model on grouped_query_attention where it has fewer key/value heads than query
    heads and gives what its family's eager attention gives: measured on the model itself
    (why_not_grouped), as the families' eager functions differ in ways no table keeps up
    with. Else eager. Returns which and why, for the build's log."""
    text = model.config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if not heads or kv_heads >= heads:
        return "eager attention (one key/value head per query head: nothing to share)"
    try:
        why = why_not_grouped(model, layers, positions)
    except Exception as err:  # e.g. a mask with a row per head, which a group cannot share
        why = f"it fails ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    if why is None:
        return f"grouped-query attention ({heads} query heads on {kv_heads} key/value heads)"
    model.set_attn_implementation("eager")
    return f"eager attention (grouped-query attention not taken: {why})"


# optimum's axis names: the pbtxt, plan profiles (catalog.PROFILE_DIMS) and parity read them
BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQUENCE}"
# the sizes of the example inputs: none 0 or 1, which the exporter would specialise on
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 3, 5


def takes(model, argument: str) -> bool:
    """Whether the model's forward has this argument (older families lack some)."""
    import inspect

    return argument in inspect.signature(model.forward).parameters


def cache_keyword(model) -> str:
    """The forward's name for the cache: transformers 5 renamed `past_key_values` to `cache`
    (the old name works until 5.40, then would fall silently into **kwargs)."""
    return "cache" if takes(model, "cache") else "past_key_values"


def present(out):
    """The cache a forward returned (transformers 5 names the output `cache` too)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def make_wrapper(model, layers: int, positions: bool, with_past: bool):
    """A module from flat tensors to (logits of the last position, *flat present)."""
    import torch
    from transformers import DynamicCache

    last_only = takes(model, "logits_to_keep")
    keyword = cache_keyword(model)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *rest):
            position_ids = rest[0] if positions else None
            past = rest[1:] if positions else rest
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)] if with_past else None
            cache = DynamicCache(pairs) if pairs else DynamicCache()
            extra = {keyword: cache, **({"position_ids": position_ids} if positions else {})}
            if last_only:  # else the onnx stage slices the last position out of all
                extra["logits_to_keep"] = 1
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=True,
                return_dict=True,
                **extra,
            )
            cache = present(out)
            flat = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

    return Step().eval()


def io_names(layers: int, positions: bool, with_past: bool) -> tuple[list[str], list[str]]:
    cache = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", *(["position_ids"] if positions else [])]
    if with_past:
        inputs += [f"past_key_values.{c}" for c in cache]
    return inputs, ["logits", *(f"present.{c}" for c in cache)]


def example_inputs(model, layers: int, positions: bool, with_past: bool) -> tuple:
    """Inputs to trace with; the past is the model's own cache of a first step, so its shapes
    (heads, key and value sizes) are whatever the family's attention makes."""
    import torch
    from transformers import DynamicCache

    batch, seq = EXAMPLE_BATCH, EXAMPLE_SEQUENCE
    past = EXAMPLE_PAST if with_past else 0
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, past + seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    inputs = [ids[:, past:], mask]
    if positions:
        inputs.append(torch.arange(past, past + seq).expand(batch, seq).contiguous())
    if with_past:
        with torch.inference_mode():
            empty = {cache_keyword(model): DynamicCache()}
            cache = present(model(input_ids=ids[:, :past], **empty))
        if len(cache.layers) != layers:
            raise ExportError(
                f"the model's cache has {len(cache.layers)} layers, not one per layer "
                f"({layers}): a cache shared across layers, which the exported files cannot pass"
            )
        inputs += [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]
    return tuple(inputs)


def dynamic_shapes(layers: int, positions: bool, with_past: bool) -> tuple:
    from torch.export import Dim

    batch, seq = Dim(BATCH, min=1), Dim(SEQUENCE, min=1)
    tokens = {0: batch, 1: seq}
    mask = {0: batch, 1: Dim("attention_length", min=1)} if with_past else tokens
    shapes = [tokens, mask, *([tokens] if positions else [])]
    if with_past:
        past = Dim(PAST, min=1)
        shapes += [{0: batch, 2: past} for _ in range(2 * layers)]
    # one entry per forward argument: `*rest` takes a tuple (a list is refused)
    return (shapes[0], shapes[1], tuple(shapes[2:]))


def name_axes(model, positions: bool, with_past: bool) -> None:
    """Give the graph's inputs and outputs optimum's axis names (the exporter's own differ)."""
    mask_length = TOTAL if with_past else SEQUENCE

    def set_dims(value, names: dict[int, str]) -> None:
        dims = value.type.tensor_type.shape.dim
        for axis, name in names.items():
            dims[axis].Clear()
            dims[axis].dim_param = name

    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            set_dims(value, {0: BATCH, 2: PAST})
        elif value.name == "attention_mask":
            set_dims(value, {0: BATCH, 1: mask_length})
        else:
            set_dims(value, {0: BATCH, 1: SEQUENCE})
    for value in model.graph.output:
        if value.name.startswith("present."):
            set_dims(value, {0: BATCH, 2: TOTAL})  # the first step's past is empty
        else:
            set_dims(value, {0: BATCH})
    del model.graph.value_info[:]  # the exporter's symbols: ONNX Runtime infers its own


@contextmanager
def explained(model_type: str, part: str):
    """torch.export's errors run to pages: one line, and what usually causes it."""
    try:
        yield
    except Exception as err:
        lines = [line.strip() for line in str(err).strip().splitlines()] or [""]
        # torch.onnx's own text starts with advice; its summary line names the cause
        first = next((line for line in lines if line.startswith("<class '")), lines[0])[:300]
        raise ExportError(
            f"torch.onnx could not export {part} of a '{model_type}' model "
            f"({type(err).__name__}: {first}); a mixture-of-experts block missing from "
            "tasks/export_torch.py's MOE_BLOCKS stops it at its loop over the experts a batch "
            "hit (add a row); exporter=optimum may take a type optimum lists"
        ) from err


def export_causal(source: Path, staged: Path, opset: int) -> dict[str, Path]:
    """decoder_model.onnx and decoder_with_past_model.onnx in `staged`: part -> file."""
    import warnings

    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention, what parity judges the files against (or what gives the same,
    # choose_attention): sdpa drops a family's attention logit soft-capping (Gemma 2's,
    # VaultGemma's) and attends from padding positions
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config = model.config
    layers = config.get_text_config(decoder=True).num_hidden_layers
    positions = takes(model, "position_ids")
    if blocks := patch_moe_blocks(model):
        print(f"onnx: {blocks} mixture-of-experts blocks run every expert (fixed loop)", flush=True)
    print(f"onnx: {choose_attention(model, layers, positions)}", flush=True)
    files = {}
    for part, with_past in (("decoder_model", False), ("decoder_with_past_model", True)):
        wrapper = make_wrapper(model, layers, positions, with_past)
        inputs, outputs = io_names(layers, positions, with_past)
        target = staged / f"{part}.onnx"
        print(f"onnx: exporting {part} with torch.onnx (dynamo, opset {opset})", flush=True)
        with warnings.catch_warnings(), torch.inference_mode(), explained(config.model_type, part):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                example_inputs(model, layers, positions, with_past),
                dynamo=True,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dynamic_shapes(layers, positions, with_past),
                external_data=True,
                optimize=True,
                verbose=False,
            )
        program.save(str(target), external_data=True)
        graph = onnx.load(str(target))  # the weights too, into memory
        name_axes(graph, positions, with_past)
        data = f"{part}.onnx.data"
        # onnx.save appends to the file torch wrote: the weights would be in it twice
        (staged / data).unlink(missing_ok=True)
        onnx.save(graph, str(target), save_as_external_data=True, location=data)
        files[part] = target
    return files
