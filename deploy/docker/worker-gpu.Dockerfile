# syntax=docker/dockerfile:1
# The GPU worker on NVIDIA's TensorRT-LLM release image, which brings CUDA, TensorRT-LLM and the torch,
# transformers and tokenizers builds it was made with. Trellis adds its gRPC/telemetry pins (not the
# model stack: pip would replace NVIDIA's CUDA torch with another build) and itself with --no-deps.
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t trellis/worker-gpu:0.1.0 .
#   docker build --build-arg TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:<tag> ...   # another release
# 1.2.1 is the newest stable (non-rc) release tag named in NVIDIA's TensorRT-LLM docs when this was
# written; 1.3.0 release candidates exist. The image is large (~30 GB) and needs an NVIDIA driver new
# enough for its CUDA.
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
FROM ${TRTLLM_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES: the image's Python is the system one (PEP 668); installing into it is the point.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    TRELLIS_LOG_FORMAT=json \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
# protobuf is pinned because the checked-in stubs are generated for that runtime; if TensorRT-LLM's
# own pins disagree, pip says so here.
RUN python3 /tmp/requirements.py --without-ml pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.py /tmp/requirements.txt

COPY trellis_rpc ./trellis_rpc
# Every process's settings (flags > TRELLIS_<PROCESS>__... env > --config TOML > defaults).
COPY trellis_settings ./trellis_settings
COPY worker_runtime ./worker_runtime
# worker_gpu uses torch_engine's model loading, stop-string matching and scoring prompts (and the
# engine itself for --engine torch); torch and transformers come with the TensorRT-LLM image.
COPY torch_engine ./torch_engine
COPY worker_gpu ./worker_gpu
RUN pip install --no-deps . && cd / && rm -rf /src

RUN groupadd --system --gid 10001 trellis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin trellis
USER 10001:10001
WORKDIR /tmp

EXPOSE 50061 9464
ENTRYPOINT ["python3", "-m", "worker_gpu"]
CMD ["--host=0.0.0.0", "--plaintext"]
