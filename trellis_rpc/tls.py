"""TLS for every hop, from files (Kubernetes secrets mounted as files).

Serving: `--tls-cert` and `--tls-key` (PEM) turn TLS on; `--tls-client-ca` also requires and verifies
client certificates (mutual TLS: workers set it to the CA of the router's certificate). Without TLS a
process serves plaintext only on loopback, or on another interface when `--plaintext` says so.
Dialling (the router to its workers): `--worker-tls-ca` verifies the workers' certificates,
`--worker-tls-cert` / `--worker-tls-key` are the router's own for mutual TLS.

Certificates rotate without a restart (cert-manager renews a secret, the kubelet swaps the mounted files):
a server reads its files again for the first handshake after they change; the router dials a worker with
the files as they are when its link (re)connects. Established connections keep the certificates they
were made with, as TLS does.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

log = structlog.get_logger("trellis.tls")


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def files_version(*paths: Path | None) -> tuple:
    """What changes when any of the files is replaced: a mounted secret's update swaps a symlink, so
    stat() (which follows it) sees a new inode and mtime."""
    out = []
    for path in paths:
        if path is not None:
            st = os.stat(path)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(frozen=True)
class ServerTLS:
    cert: Path
    key: Path
    # Set: mutual TLS, every client must present a certificate this CA signed. (gRPC's Python API
    # cannot ask for an optional one: without require_client_auth it asks for none at all.)
    client_ca: Path | None = None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())],
                                                         root_certificates=_read(self.client_ca))

    def credentials(self) -> grpc.ServerCredentials:
        reloader = _Reloader(self)
        return grpc.dynamic_ssl_server_credentials(reloader.initial, reloader.fetch,
                                                   require_client_authentication=self.client_ca is not None)


class _Reloader:
    """gRPC asks before each handshake; a new configuration only when the files changed. A read that fails
    (the files mid-swap) keeps the current one, and the next handshake asks again."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls
        self.version = files_version(tls.cert, tls.key, tls.client_ca)
        self.initial = tls.configuration()
        self._lock = threading.Lock()   # handshakes run on gRPC's threads

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                version = files_version(self.tls.cert, self.tls.key, self.tls.client_ca)
                if version == self.version:
                    return None
                config = self.tls.configuration()
            except OSError as exc:
                log.warning("tls files unreadable; serving the certificate loaded before", error=str(exc))
                return None
            self.version = version
            log.info("tls certificate reloaded", cert=str(self.tls.cert))
            return config


@dataclass(frozen=True)
class ClientTLS:
    ca: Path | None = None             # None: the system's roots
    cert: Path | None = None           # with key: this side's certificate, for mutual TLS
    key: Path | None = None
    server_name: str = ""              # expect this name in the server's certificate instead of the host dialled

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca), private_key=_read(self.key),
                                            certificate_chain=_read(self.cert))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def version(self) -> tuple:
        """Changes when any of the files does (see files_version); () when one cannot be read."""
        try:
            return files_version(self.ca, self.cert, self.key)
        except OSError:
            return ()


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate (PEM; with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="mutual TLS: require client certificates signed by this CA (PEM)")
    p.add_argument("--plaintext", action="store_true",
                   help="serve without TLS on a non-loopback --host (plaintext is otherwise loopback-only)")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_tls(args: argparse.Namespace, p: argparse.ArgumentParser) -> ServerTLS | None:
    """The serving TLS the flags ask for; refuses half a configuration and unasked-for plaintext."""
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        p.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            p.error(f"--{flag.replace('_', '-')}: {path} is not a readable file")
    if args.tls_cert:
        if args.plaintext:
            p.error("--plaintext contradicts --tls-cert")
        return ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
    if not args.plaintext and not is_loopback(args.host):
        p.error(f"--host {args.host} is not loopback: serve TLS (--tls-cert, --tls-key) or say --plaintext")
    return None


def add_client_args(p: argparse.ArgumentParser, prefix: str, what: str) -> None:
    p.add_argument(f"--{prefix}tls-ca", type=Path, help=f"dial {what} over TLS, verifying them with this CA (PEM)")
    p.add_argument(f"--{prefix}tls-cert", type=Path, help=f"mutual TLS: the certificate to present to {what}")
    p.add_argument(f"--{prefix}tls-key", type=Path, help="mutual TLS: that certificate's private key")
    p.add_argument(f"--{prefix}tls-server-name", default="",
                   help=f"the name {what}' certificates carry, when it is not the host dialled")


def client_tls(args: argparse.Namespace, p: argparse.ArgumentParser, prefix: str) -> ClientTLS | None:
    attr = prefix.replace("-", "_")
    ca, cert, key = (getattr(args, f"{attr}tls_{x}") for x in ("ca", "cert", "key"))
    name = getattr(args, f"{attr}tls_server_name")
    if bool(cert) != bool(key):
        p.error(f"--{prefix}tls-cert and --{prefix}tls-key go together")
    for path in (ca, cert, key):
        if path is not None and not path.is_file():
            p.error(f"{path} is not a readable file")
    if not (ca or cert or name):
        return None
    return ClientTLS(ca, cert, key, name)
