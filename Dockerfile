# Images for GPU hosts (this project's CI machine has no Docker engine and no GPU).
# TensorRT in the exporter matches the server's (both NGC 24.10: TensorRT 10.5, Triton 2.51),
# so a plan built by `doit` loads in the server.
#
#   docker compose build
#   docker compose run --rm exporter task=encode backend=tensorrt   # builds models/
#   docker compose up triton                                       # serves models/

# The server: NVIDIA's Triton plus what our python-backend models import.
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS server
# CuPy reads generation's logits on the GPU, so the KV cache stays there between engine calls.
RUN pip install --no-cache-dir numpy==1.26.4 tokenizers==0.22.2 onnxruntime==1.20.1 \
    cupy-cuda12x==13.3.0

# The exporter: everything `doit` needs, TensorRT included.
FROM nvcr.io/nvidia/tensorrt:24.10-py3 AS exporter
WORKDIR /workspace/llm-in-triton
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENTRYPOINT ["doit"]
CMD ["task=encode", "backend=tensorrt"]
