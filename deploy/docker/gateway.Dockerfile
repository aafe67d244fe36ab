# syntax=docker/dockerfile:1
# The OpenAI-compatible HTTP gateway: Starlette on uvicorn (httptools), a gRPC client of the router through
# trellis_client. No model stack (torch, transformers) and no httpx (a worker_openai dependency the gateway
# does not import), then the project with --no-deps.
#   docker build -f deploy/docker/gateway.Dockerfile -t trellis/gateway:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRELLIS_LOG_FORMAT=json \
    HOME=/tmp

WORKDIR /src
# Dependencies first: this layer is rebuilt only when the pins change, not on every source edit.
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python /tmp/requirements.py --without-ml --without httpx pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.py /tmp/requirements.txt

COPY trellis_rpc ./trellis_rpc
# Every process's settings (flags > TRELLIS_<PROCESS>__... env > --config TOML > defaults).
COPY trellis_settings ./trellis_settings
COPY trellis_client ./trellis_client
COPY gateway ./gateway
RUN pip install --no-deps . && cd / && rm -rf /src

RUN groupadd --system --gid 10001 trellis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin trellis
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /tmp

EXPOSE 8080 9464
ENTRYPOINT ["python", "-m", "gateway"]
# Listen beyond loopback; the router from TRELLIS_ROUTER, --router or a --config file (arguments given replace
# this line):
#   docker run -p 8080:8080 trellis/gateway:0.1.0 --host=0.0.0.0 --plaintext --router=router.example:50051
CMD ["--host=0.0.0.0", "--plaintext"]
