# syntax=docker/dockerfile:1
# The OpenAI-compatible worker: forwards to a server that runs the model (vLLM, SGLang, llama.cpp,
# trtllm-serve, transformers serve, a hosted endpoint), so no torch and no GPU. transformers and tokenizers
# stay for --tokenizer (chat templates rendered here, exact token ids); mount the model's tokenizer files
# and pass --tokenizer=DIR, nothing comes from a model hub. A .gguf file as --tokenizer does not work here:
# transformers reads GGUF only with torch and gguf installed; give the directory of the model the GGUF
# was converted from (tokenizer.json, tokenizer_config.json) instead.
#   docker build -f deploy/docker/worker-openai.Dockerfile -t trellis/worker-openai:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRELLIS_LOG_FORMAT=json \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
# Without torch (~1 GB) and what only torch_engine needs; safetensors stays, transformers requires it, and
# jinja2 renders the tokenizer's chat template.
RUN python /tmp/requirements.py --without torch,accelerate,gguf pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.py /tmp/requirements.txt

COPY trellis_rpc ./trellis_rpc
# Every process's settings (flags > TRELLIS_<PROCESS>__... env > --config TOML > defaults).
COPY trellis_settings ./trellis_settings
COPY worker_runtime ./worker_runtime
COPY worker_openai ./worker_openai
RUN pip install --no-deps . && cd / && rm -rf /src

RUN groupadd --system --gid 10001 trellis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin trellis
USER 10001:10001
WORKDIR /tmp

EXPOSE 50061 9464
ENTRYPOINT ["python", "-m", "worker_openai"]
# Listen beyond loopback. --base-url (or base_url in a --config file) is required and arguments given replace
# this line, so give all of them:
#   docker run trellis/worker-openai:0.1.0 --host=0.0.0.0 --plaintext --base-url=http://vllm:8000/v1 --upstream-kind=vllm
CMD ["--host=0.0.0.0", "--plaintext"]
