# Images for GPU hosts (this project's CI machine has no Docker engine and no GPU).
# Both stages are NGC 24.10: Triton 2.51 (the version of the tritonserver the tests run here)
# and TensorRT 10.5 in both, so a plan built by `doit` loads in the server. NGC 24.10 is
# Ubuntu 22.04 with Python 3.10, so every pin in requirements/ has wheels for 3.10;
# tests/test_docker.py resolves each stage's packages for its stated Python with pip.
#
#   docker compose build
#   docker compose run --rm exporter task=encode backend=tensorrt   # builds models/
#   docker compose up triton                                       # serves models/

# The server: NVIDIA's Triton plus what our python-backend models import, from the same
# requirements/server.txt that the embedded server's venv installs, so that what is served
# is what parity proved.
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS server
ARG PYTHON_VERSION=3.10
COPY requirements/server.txt /tmp/requirements/server.txt
# CuPy (GPU only, so not in server.txt) reads generation's logits on the GPU, so the KV
# cache stays there between engine calls.
RUN pip install --no-cache-dir -r /tmp/requirements/server.txt cupy-cuda12x==13.3.0
# The server's entrypoint: it starts tritonserver and reloads a model whose python stub dies
# (Triton 2.51 keeps answering ready while such a model fails every request).
COPY triton/supervisor/supervisor.py /opt/llm-in-triton/supervisor.py

# The exporter: everything `doit` needs; TensorRT comes with the base image.
FROM nvcr.io/nvidia/tensorrt:24.10-py3 AS exporter
ARG PYTHON_VERSION=3.10
WORKDIR /workspace/llm-in-triton
COPY requirements/ requirements/
RUN pip install --no-cache-dir -r requirements/exporter.txt
RUN pip install --no-cache-dir --no-binary=:all: --no-deps -r requirements/sdist.txt
# The project itself (.dockerignore keeps the host's venv and build outputs out).
COPY . .
ENTRYPOINT ["doit"]
CMD ["task=encode", "backend=tensorrt"]
