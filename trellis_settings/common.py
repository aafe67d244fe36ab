"""Sections every server shares, with the flags trellis_rpc's helpers add (tls.add_server_args,
tls.add_client_args, telemetry.add_metrics_args)."""

from __future__ import annotations

from pathlib import Path

from pydantic import create_model

from trellis_settings.fields import Section, setting


class ServerTLS(Section):
    cert: Path | None = setting(None, "serve TLS with this certificate (PEM; with key)", flag="tls_cert")
    key: Path | None = setting(None, "the certificate's private key (PEM)", flag="tls_key")
    client_ca: Path | None = setting(None, "mutual TLS: require client certificates signed by this CA (PEM)",
                                     flag="tls_client_ca")
    plaintext: bool = setting(False, "serve without TLS on a non-loopback host (plaintext is otherwise loopback-only)",
                              flag="plaintext")


class WorkerServer(Section):
    """Where every worker kind serves the worker contract."""
    host: str = setting("127.0.0.1", "interface to serve on", flag="host")
    port: int = setting(50061, "0 picks a free port (printed in the 'serving' log line)", flag="port", ge=0,
                        le=65535)
    drain_seconds: float = setting(30.0, "grace period for in-flight work on SIGTERM", flag="drain_seconds", ge=0)
    worker_id: str = setting("", "the id this worker gives routers (defaults to a random id)", flag="worker_id")


class ModelLoading(Section):
    """The flags torch_engine.model_loader.add_model_args adds, for the worker kinds that load a model; a worker's
    own model section adds the model and its dtype."""
    trust_remote_code: bool = setting(False, "run Python code that the model directory ships (config.json auto_map); "
                                      "off: a model directory is data, not code", flag="trust_remote_code")
    max_context_tokens: int = setting(
        0, "tokens per sequence (prompt and generated, or a scored candidate with its prompt) below the model's own "
        "context (TensorRT-LLM's max_seq_len): longer prompts are refused (CONTEXT_LENGTH_EXCEEDED), generation stops "
        "there; 0: the model's context", flag="max_context_tokens", ge=0)


class Telemetry(Section):
    metrics_port: int = setting(0, "Prometheus metrics at http://<metrics_host>:PORT/metrics (0: off)",
                                flag="metrics_port", env="TRELLIS_METRICS_PORT", ge=0, le=65535)
    metrics_host: str = setting("127.0.0.1", "interface of the metrics endpoint (plain HTTP: loopback unless "
                                "another is named, e.g. 0.0.0.0 for a scraper in the cluster)", flag="metrics_host")


def client_tls(prefix: str, what: str) -> type[Section]:
    """The TLS a process dials `what` with; flags --<prefix>tls-ca and so on."""
    dest = prefix.replace("-", "_")
    return create_model(
        f"{dest.title().replace('_', '')}ClientTLS", __base__=Section,
        ca=(Path | None, setting(None, f"dial {what} over TLS, verifying them with this CA (PEM)",
                                 flag=f"{dest}tls_ca")),
        cert=(Path | None, setting(None, f"mutual TLS: the certificate to present to {what}",
                                   flag=f"{dest}tls_cert")),
        key=(Path | None, setting(None, "mutual TLS: that certificate's private key", flag=f"{dest}tls_key")),
        server_name=(str, setting("", f"the name {what}' certificates carry, when it is not the host dialled",
                                  flag=f"{dest}tls_server_name")))
