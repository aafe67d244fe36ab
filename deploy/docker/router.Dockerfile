# syntax=docker/dockerfile:1
# The router: controllers and gRPC only. It imports neither torch nor transformers (docs/ARCHITECTURE.md),
# so the image installs pyproject.toml's pins minus the model stack, then the project with --no-deps:
# ~150 MB instead of the ~1 GB torch would add.
#   docker build -f deploy/docker/router.Dockerfile -t trellis/router:0.1.0 .
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
RUN python /tmp/requirements.py --without-ml pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.py /tmp/requirements.txt

# client/ brings the `trellis` CLI, handy from inside the pod: kubectl exec deploy/router -- trellis controllers
# (it runs on trellis_client, the Python client library).
COPY trellis_rpc ./trellis_rpc
# Every process's settings (flags > TRELLIS_<PROCESS>__... env > --config TOML > defaults).
COPY trellis_settings ./trellis_settings
COPY controllers ./controllers
COPY router ./router
COPY trellis_client ./trellis_client
COPY client ./client
RUN pip install --no-deps . && cd / && rm -rf /src

RUN groupadd --system --gid 10001 trellis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin trellis
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /tmp

EXPOSE 50051 9464
ENTRYPOINT ["python", "-m", "router"]
# Listen beyond loopback; workers from TRELLIS_WORKERS, --workers or a --config file (arguments given replace
# this line; deploy/k8s passes only --config=/etc/trellis/trellis.toml, a mounted ConfigMap).
CMD ["--host=0.0.0.0", "--plaintext"]
