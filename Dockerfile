# Images for GPU hosts (this project's CI machine has no Docker engine and no GPU).
# Both stages are NGC 26.05: Triton 2.69 (it carries the fixes of NVIDIA's August 2025 security
# bulletin, see docs/security.md) and the same TensorRT 10 in both, so a plan built by `doit`
# loads in the server. 26.05 is the newest release with TensorRT 10: TensorRT 11 removed builder
# flags our plan stage still uses. NGC 26.05 is Ubuntu 24.04 with Python 3.12, so every pin in
# requirements/ has wheels for 3.12; tests/test_docker.py resolves each stage's packages for
# its stated Python with pip.
#
#   docker compose build
#   docker compose run --rm exporter task=encode backend=tensorrt   # builds models/
#   docker compose up triton                                       # serves models/
#
# Both run as a non-root user of uid 1000 (the server: NVIDIA's own `triton-server`), so what
# the exporter writes into models/ the server reads.

# secret_args.so: the library the supervisor preloads into tritonserver so that the admin key
# and the API key never show on its command line (triton/supervisor/secret_args.c, access.py).
# Built apart, for the server's Ubuntu 24.04, so the server image carries no compiler.
FROM ubuntu:24.04 AS secret-args
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
  && rm -rf /var/lib/apt/lists/*
COPY triton/supervisor/secret_args.c /build/secret_args.c
RUN gcc -shared -fPIC -O2 -o /build/secret_args.so /build/secret_args.c

# The server: NVIDIA's Triton plus what our python-backend models import, from the same
# requirements/server.txt that the embedded server's venv installs, so that what is served
# is what parity proved.
FROM nvcr.io/nvidia/tritonserver:26.05-py3 AS server
ARG PYTHON_VERSION=3.12
COPY requirements/server.txt /tmp/requirements/server.txt
# CuPy (GPU only, so not in server.txt) reads generation's logits on the GPU, so the KV
# cache stays there between engine calls. NGC 26.05 is CUDA 13; CuPy 13.6 is the last release
# that takes numpy 1.x (server.txt's pin for the embedded server's python backend).
RUN pip install --no-cache-dir -r /tmp/requirements/server.txt cupy-cuda13x==13.6.0
# The server's entrypoint: it starts tritonserver with its admin APIs (and inference, given an
# API key) closed behind keys read from files, and reloads a model whose python stub dies.
# access.py and secret_args.so sit beside it, where it looks for them.
COPY triton/supervisor/supervisor.py /opt/llm-in-triton/supervisor.py
COPY triton/supervisor/access.py /opt/llm-in-triton/access.py
COPY --from=secret-args /build/secret_args.so /opt/llm-in-triton/secret_args.so
# CuPy compiles kernels into a cache under HOME by default; the root filesystem may be
# read-only (docker-compose.yml, k8s/), /tmp is not.
ENV CUPY_CACHE_DIR=/tmp/cupy-kernel-cache
# NVIDIA's non-root user (uid 1000, gid 1000), made by the base image.
USER triton-server
# Ready means every model loaded and answering (the supervisor adds --strict-readiness);
# on Triton's default HTTP port, which docker-compose.yml keeps. Python, not curl: the
# supervisor needs it anyway.
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]

# The exporter: everything `doit` needs; TensorRT comes with the base image.
FROM nvcr.io/nvidia/tensorrt:26.05-py3 AS exporter
ARG PYTHON_VERSION=3.12
# Ubuntu 24.04 marks its Python as externally managed (PEP 668); this image is ours alone.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /workspace/llm-in-triton
COPY requirements/ requirements/
RUN pip install --no-cache-dir -r requirements/exporter.txt
RUN pip install --no-cache-dir --no-binary=:all: --no-deps -r requirements/sdist.txt
# The project itself (.dockerignore keeps the host's venv and build outputs out).
COPY . .
# A non-root user of the server's uid and gid, so the server reads what this one writes into
# the mounted models/; Ubuntu 24.04's own `ubuntu` user holds uid 1000 until it is removed.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
  && groupadd --gid 1000 builder && useradd --uid 1000 --gid 1000 --create-home builder
USER builder
# A batch job (`docker compose run --rm exporter ...`) that serves nothing: no health to check
# while it runs, and it exits when done. (checkov reads the file as one image, so the server's
# HEALTHCHECK passes CKV_DOCKER_2 for both; tests/test_docker.py checks each stage.)
HEALTHCHECK NONE
ENTRYPOINT ["doit"]
CMD ["task=encode", "backend=tensorrt"]
