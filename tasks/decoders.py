"""docs/decoders.md: every causal-LM model type of the installed transformers, the exporter
`exporter=auto` takes for it (or why it is refused), and what a tiny random model of it did at
the parity gate when one was built (tasks/data/decoder_parity.json, written by
`python -m tests.helpers.decoder_parity TYPE...`).

    python -m tasks.decoders        # writes docs/decoders.md afresh; a test keeps it equal
"""

from __future__ import annotations

from tasks import artifacts, catalog, exporters, paths
from tasks.errors import ModelSourceError

ERROR_CHARS = 140  # of a failed build's error in the table (all of it in the .json)
HEADER = """\
# Decoders: which exporter, and what parity said

Made by `python -m tasks.decoders` from the installed transformers {transformers} and
optimum-onnx {optimum_onnx}; a test keeps it equal to a recomputation. `exporter=auto` (the
default) takes optimum where it lists the model type for text generation with a cache, else
the generic `torch.onnx` path (tasks/export_torch.py); a `doit task=causallm` build proves
either with the parity gate (each file at the profile's shapes, then greedy decoding against
`generate()`).

The parity column records the builds that were run: a tiny random model of the type (2 layers,
32 wide, sliding window 8 where the family has one, 4 experts with 2 per token where it has
experts), built by `python -m tests.helpers.decoder_parity TYPE...` through the parity stage
(batch=1,4,8 seq=1,32,64), with the date and transformers version in
tasks/data/decoder_parity.json. "not run" means no build was tried: the exporter column
says what would run. Some types in transformers' causal-LM list are encoders with a language
modelling head (bert, roberta...), which task=causallm does not serve well.

Mixture-of-experts blocks that tasks/export_torch.py's `MOE_BLOCKS` table knows
({moe}) run every expert on every token during export, weighted by the routing (zero outside
the top k): the same sums as the sparse loop at num_experts / top_k times the experts' compute
(Mixtral 8/2 = 4x, Qwen3-MoE 128/8 = 16x the expert FLOPs; attention is unchanged). `doit
bench` on such a deployment measures it on the checkpoint's own block (report.json's
`moe_dense_vs_topk`, [docs/benchmark.md](benchmark.md)): PyTorch, one thread, CPU time of that
thread, the sparse top-k forward against the fixed loop. On a Mixtral-shaped block (512 wide,
1408 in the experts, 8 experts, top 2; AMD EPYC, 2 cores shared) the fixed loop took 4.1x to
5.9x the top-k forward's time for 1 token (one decode row), 1.4x for 16 tokens (a decode step of
16 rows hits nearly every expert anyway) and 2.9x to 3.1x for 256 (a prompt), in runs at load
average 8 and 3 ([docs/benchmark.md](benchmark.md) has the times).
Other MoE blocks either
trace as they are (granitemoe's) or stop the export at transformers' loop over the experts a
batch hit, and the build says to add a row to the table.

`exporter=auto` also takes the generic path for the types in catalog.TORCH_OVER_OPTIMUM
({preferred}): optimum lists them, but its files failed the parity gate here while the generic
path's passed. So it does for a checkpoint whose sliding window is shorter than its positions
(`exporters.window_cut`: Mistral v0.1's 4096 of 32768; a tiny Mistral and Qwen2 with a window of
8 failed parity on optimum's files, whose cache keeps every position where transformers' keeps
the window, and pass on the generic path's). The generic path exports transformers' eager
attention and parity judges its files against the same: the sdpa path drops a family's attention
logit soft-capping (Gemma 2's, VaultGemma's: vaultgemma failed parity by 5e-4 for that alone
until the export took eager attention too), and lets the padding positions of a left-padded row
attend to everything, which changes only cache entries that no query reads (gpt2 on the generic
path failed the gate for that alone, as file parity compares every position of the cache; with
eager attention exported it passes).

Grouped-query attention (fewer key/value heads than query heads) is exported without
transformers' `repeat_kv`, which copies each key/value head's cache to every query head of its
group at every step (Expand nodes: 19% of the bench model's decoding step at batch 16). The
queries of a group ride as extra rows against their key/value head instead
(`grouped_query_attention` in tasks/export_torch.py, under a name of its own in transformers'
attention interface; standard operators: MatMul, Reshape, Add, Softmax, no contrib operator;
TensorRT, absent here, has not read it). It follows eager's
scaling, soft-capping (Gemma 2) and sink logits (gpt-oss), and each model takes it only if a
step with a past and a left-padded row gives eager's logits and cache (within 1e-5 of their
largest value); otherwise the export stays eager and the build's log says why (in 4.57,
diffllama, olmoe, phimoe and qwen2_moe do not go through the interface). The tiny models of the
table that took it gave eager's outputs exactly and passed the gate again. The bench model's
decoding step (`doit bench_model`: 8 query heads on 2 key/value heads), ONNX Runtime on CPU, 2
threads, median of 40 runs, three runs on a 2-core AMD EPYC (AVX2) at load average about 1
(shared): at batch 16 with a past 55, 128 and 200 wide, 9.1 to 9.3, 9.7 to 10.4 and 11.0 to 11.6
ms, where the same export with eager attention took 1.2x to 1.3x, 1.4x to 1.6x and 1.5x to 1.8x
as long, and optimum's file 1.3x to 1.4x, 1.5x to 1.7x and 1.6x to 1.9x; at batch 1 (4.0 to 4.6
ms), eager took 1.1x to 1.25x as long. The prompt step costs the same (within 8%).

DeepSeek's latent attention: its keys have one head per query head, so its tiny random models
here take as many key/value heads as query heads, as the real configs do (with fewer, eager
attention cannot run them even in PyTorch: what stopped deepseek_v3's eager export here).
deepseek_v3 then passes the parity gate on both paths (optimum's, which `auto` takes, and the
generic one); deepseek_v2 is
refused before any work (catalog.TORCH_EXPORT_REFUSED): its rotary embedding multiplies complex
numbers, which ONNX has no type for.

Sliding-window layers are exact: the exported files keep every layer's cache whole (the
mask, not the cache, limits what a sliding layer sees), so past the window the cache still
grows by one position per token, to at most the prompt plus the new tokens, as a full-attention
model's does.

Exporting a random 125M-parameter Llama (12 layers, 768 wide, 476 MB in fp32), the onnx stage
(both files) took 60 s and 3.7 GB peak memory with optimum, 85 s and 3.1 GB with the generic
path (`/usr/bin/time -v`; a 2-core AMD EPYC shared with other jobs, so rough).

## Weights past 2 GiB

Protobuf caps one ONNX file at 2 GiB. The onnx stage decides before exporting, from the
checkpoint's weight files counted as the fp32 it exports (`exporters.external_data`,
`catalog.EXTERNAL_DATA_BYTES`: 2 GiB less 64 MiB for the graph), and past it writes each part
with external data on either path: the weights in `<part>.onnx.data` beside `<part>.onnx`,
written in a temporary folder and renamed into place (the data file first, the `.onnx` last),
both hashed in `<part>.io.json`, so a changed data file re-exports and rebuilds what follows.
Every later stage reads the pair: parity (ONNX Runtime and Polygraphy load it by path), the
`fp16` copy and the ONNX Runtime quantization recipes (their copies are laid out as their
source; ModelOpt's recipes refuse such a file, naming the ones that take it), the plan stage
(TensorRT's parser reads the data file from the `.onnx`'s folder), the repository (the data
file sits beside the `.onnx` under the name its graph refers to, also where the file is served
as `model.onnx`: ONNX Runtime in the python backend reads it from there), and `doit publish`,
which uploads every file of a model's folder. The tests lower the limit through an environment
variable only the onnx stage reads (`LLM_IN_TRITON_EXTERNAL_DATA_BYTES`, an internal knob) to
build and serve a tiny Llama with external data on both paths.

{external_figures}

## Every causal-LM model type

| model type | exporter (auto) | tiny random model at the parity gate |
|---|---|---|
"""

EXTERNAL_FIGURES = """\
Measured once on a random Llama of 602M parameters (24 layers, 1536 wide, 4096 in the MLP,
grouped-query attention; 2.42 GB of fp32 safetensors, made with `save_pretrained`): `doit onnx`,
then `doit parity` (batch=1,1,2 seq=1,8,16), each under `/usr/bin/time -v`, one path after the
other, on a 2-core AMD EPYC (AVX2) with 24 GB, shared with other sessions' builds and tests (load
average 3 at the start, 7 to 10 for most of it). The wall times are mostly waiting for a core:
the CPU time (user + system) says more; the peak memory does not depend on the load.

| exporter | onnx stage, wall (CPU) | peak memory | parity | wall (CPU) | peak memory |
|---|---|---|---|---|---|
| optimum | 4 min 38 s (95 s) | 9.7 GB | passed | 2 min 55 s (42 s) | 7.6 GB |
| torch | 20 min 18 s (214 s) | 7.9 GB | passed | 4 min 1 s (43 s) | 7.6 GB |

Both wrote 1.1 MB `.onnx` files beside 2.42 GB data files; the greedy ids equalled `generate()`.
The 24 GB held either path. The peaks are 4.0x (optimum) and 3.3x (torch) the weights; at those
ratios, not measured, about 1.5B parameters would fill 24 GB on optimum's path, 1.8B on torch's.
"""


# Measured in a venv of its own, never the project's; written by hand (tasks/decoders.py),
# outside the table, which is the installed transformers' own.
TRANSFORMERS_5 = """
## transformers 5

What moving the pin from transformers 4.57.6 to 5.x would take, measured on 2026-12-06 in a
separate venv: Python 3.11.7, requirements.txt with **transformers 5.25.0** (the newest on the
index) in place of 4.57.6, everything else as pinned (torch 2.13.0+cpu, onnx 1.23.2,
onnxscript 0.7.2, onnxruntime 1.23.2, optimum 2.1.0), except what transformers 5.25 requires:
tokenizers 0.23.3 (it needs >=0.23.1,<0.24; requirements/server.txt pins 0.22.2 for the
served tokenizers too), huggingface-hub 2.4.0 (was 0.36.2) and a new `kernels` 0.19.1. It
installed in 3 min, `pip check` clean. transformers 5.25 needs Python 3.11 or later (here 3.11,
the images 3.12). It knows 200 causal-LM model types (4.57.6: 139).

**What blocks: optimum-onnx.** 0.1.0 is the newest release and requires transformers<4.58, so
pip refuses it beside 5.25 (ResolutionImpossible). Forced in with `--no-deps` it fails at
import: `cannot import name '_CAN_RECORD_REGISTRY' from 'transformers.utils.generic'`. Without
it nothing exports the encoder tasks (encode, seqcls, qa, ner, rerank) nor t5: their builds
stop at download, naming the fix. Decoders take the generic path. optimum-onnx's own tracker
asks for transformers 5 (its issues 114 and 141, open); no release on the index has it. So
the pin can move only with a release of optimum-onnx for transformers 5, or a generic
torch.onnx path for the encoder heads and T5 (not built); the whole suite was not run on 5.x
(a shared 2-core machine), and it cannot pass without one of the two.

**Generic path on 5.25.0: every family tried exported and passed the parity gate**
(`exporter=torch`, tiny random models as in the table above, batch=1,4,8 seq=1,32,64, each
file at min, opt and max, then greedy decoding against `generate()`): llama, qwen2,
starcoder2, glm4, cohere2 (sliding and full layers), ministral, gemma3_text, gpt2, and the
mixtures of experts mixtral, qwen2_moe (gated shared expert), qwen3_moe, olmoe and gpt_oss
(transposed, biased experts with their own gate): 13 of 13. gpt2 passes on 5.25 where it
fails on 4.57.6 (the padding positions of its cache, above). A build (the tiny model made,
then `doit parity`) took about a minute: 7 of them 7.6 min, a tiny llama alone 33 s, on a
2-core AMD EPYC (AVX2) shared with three other jobs (load average 6 to 9).
tests/test_decoders.py on 5.25 (glm4, cohere2, ministral, mixtral,
qwen2_moe and llama built, served by the real tritonserver, greedy output equal to
`generate()`): 6 passed, and 1 failed only because `exporter=auto` cannot take optimum for
llama there. tests/test_inflight_serving.py (in-flight batching of a llama, here through the
generic path): 7 passed. To repeat: a copy of requirements.txt and requirements/ with
`transformers==5.25.0` and `tokenizers==0.23.3` and without optimum-onnx, installed into a new
venv; then, in a clone of the project, that venv's `python -m tests.helpers.decoder_parity
--exporter torch llama mixtral ...` (it writes the clone's tasks/data/decoder_parity.json).

**What broke on 5.x, and what the code does now** (each fix runs on 4.57.6 and 5.25.0):
- tasks/exporters.py imported optimum's ONNX exporter to choose, even for `exporter=torch`.
  Now `exporter=torch` asks nothing of optimum, and without optimum-onnx `exporter=auto` takes
  the generic path, saying why; `exporter=optimum` and the encoder tasks fail naming the fix.
- Mixture-of-experts blocks were rewritten: the router is a module returning (logits, top-k
  weights, top-k indices), and the experts are one module of 3D weights (`gate_up_proj`,
  `down_proj`, optional biases, transposed or not) behind `@use_experts_implementation`, whose
  implementations loop over the experts a batch hit (`eager`), sort tokens by expert
  (`grouped_mm`, the default on CPU) or gather each token's expert weights (`batched_mm`).
  `MOE_BLOCKS`' forwards broke at the router's tuple. Now the experts module itself gets the
  fixed loop over every expert, reading its layout flags as `batched_mm` does, and the block
  keeps transformers' routing: one rule for the 72 model folders of 5.25 that use the
  decorator; `MOE_BLOCKS` serves 4.57. Against transformers' own forward on tiny models the
  logits differ by at most 4e-6 (mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, glm4_moe,
  granitemoe, flex_olmo, phimoe, ernie4_5_moe, hunyuan_v1_moe; deepseek_v3 by its blocks).
  `batched_mm` would trace as it is, but it copies two weight matrices per token and expert
  (a Mixtral-8x7B expert's `gate_up_proj` alone is 470 MB in fp32): not for real sizes.
- The cache argument is `cache` now (`past_key_values` is renamed by a decorator until 5.40,
  after which it would fall unread into `**kwargs`), and outputs carry `cache` too. The generic
  exporter passes it by the forward's own name; tasks/generation_parity.py still says
  `past_key_values` and must follow before 5.40.
- Not transformers' doing, but found here: the tiny qwen2 (and qwen3, smollm3) configs had
  sliding layers with `use_sliding_window` off, so no window: forward failed on both versions.
  tests/helpers/models.py turns it on with the layer types.

**Unchanged on 5.25**: in the lean suite's quick modules (settings, docs, architecture,
runtime helpers, decoding against transformers' logits warpers, the in-flight detokenizer,
encoding against the fast tokenizer, ner against the pipeline, k8s, graph, lint, ...), 239
passed; every one of the 19 failures and 8 errors is a build that needs optimum-onnx (t5,
MiniLM, RoBERTa heads, `exporter=optimum`), a test expecting `exporter=auto` to choose
optimum, or this table, which is made from the installed versions.
"""


def exporter_of(model_type: str) -> str:
    """What `exporter=auto` does with a causal-LM model type: the path, or the refusal."""
    try:
        return exporters.choose(catalog.TASKS["causallm"], model_type, "auto").path
    except ModelSourceError as err:
        reason = catalog.UNSUPPORTED_CACHES.get(model_type)
        reason = reason or catalog.TORCH_EXPORT_REFUSED.get(model_type)
        return f"refused: {reason}" if reason else f"refused: {err}"


def parity_cell(model_type: str, results: dict) -> str:
    """Each recorded build of this type: outcome (exporter that ran), date, error if any."""
    cells = []
    for key, record in results.items():
        if key.split(" ")[0] != model_type:
            continue
        ran = record.get("exporter") or "no export"
        cell = f"{record['parity']} ({ran}), {record.get('date', '?')}"
        if record["parity"] != "passed":
            error = record.get("error", "?")[:ERROR_CHARS].replace("|", "/").replace("\n", " ")
            cell += f": {error}"
        cells.append(cell)
    return "; ".join(cells) or "not run"


def decoders_table() -> str:
    results = artifacts.read_json(paths.DECODER_PARITY) if paths.DECODER_PARITY.is_file() else {}
    versions = artifacts.versions("transformers", "optimum-onnx")
    moe = ", ".join(f"`{name}`" for name in _moe_blocks())
    rows = [
        f"| `{t}` | {exporter_of(t)} | {parity_cell(t, results)} |"
        for t in exporters.causal_lm_types()
    ]
    header = HEADER.format(
        transformers=versions["transformers"],
        optimum_onnx=versions["optimum-onnx"],
        moe=moe,
        preferred=", ".join(f"`{t}`" for t in catalog.TORCH_OVER_OPTIMUM),
        external_figures=EXTERNAL_FIGURES.rstrip(),
    )
    return header + "\n".join(rows) + "\n" + TRANSFORMERS_5


def _moe_blocks() -> list[str]:
    from tasks.export_torch import MOE_BLOCKS

    return list(MOE_BLOCKS)


if __name__ == "__main__":
    artifacts.write_text(paths.DECODERS_DOC, decoders_table())
