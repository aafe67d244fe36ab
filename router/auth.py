"""Who may call the router, and how much they may ask for.

`--auth-file PATH` (JSON, e.g. a mounted Kubernetes secret) lists the clients:

    {"allow_anonymous": false,
     "clients": [
       {"name": "search", "token_sha256": "<sha256 hex of the bearer token>",
        "controllers": ["majority_vote", "best_of_n"], "max_n": 16, "max_tokens": 512, "max_concurrent_runs": 8},
       {"name": "batch", "mtls_common_name": "batch.jobs.svc", "controllers": "*"}]}

A client proves who it is with `authorization: Bearer <token>` metadata (only the token's SHA-256 is
stored: `printf %s "$TOKEN" | sha256sum`) or with the common name of the client certificate it
presented under mutual TLS. Unknown callers get UNAUTHENTICATED; a client asking for a controller or
an amount beyond its entry gets PERMISSION_DENIED naming the field. Health and reflection stay open
(they are separate services; Kubernetes probes them). Without --auth-file the router is open, and
per-client limits key on the `x-trellis-client` metadata or the peer's host.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from trellis_rpc.errors import StatusError

_FIELDS = {"name", "token_sha256", "mtls_common_name", "controllers", "max_n", "max_tokens", "max_concurrent_runs"}


@dataclass(frozen=True)
class ClientPolicy:
    name: str
    controllers: frozenset[str] | None = None     # None: every controller
    max_n: int | None = None
    max_tokens: int | None = None
    max_concurrent_runs: int | None = None

    def check_controller(self, controller: str, field: str) -> None:
        if self.controllers is not None and controller not in self.controllers:
            allowed = ", ".join(sorted(self.controllers)) or "none"
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED,
                              f"{field}: client {self.name!r} may not run {controller!r} (allowed: {allowed})", field)


def _positive(entry: dict, key: str, where: str) -> int | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{where}.{key}: must be a positive integer, got {value!r}")
    return value


class Authenticator:
    def __init__(self, clients: list[tuple[ClientPolicy, str, str]], allow_anonymous: bool = False) -> None:
        """clients: (policy, token sha256 hex or "", mTLS common name or "")."""
        self.by_token = {token: policy for policy, token, _ in clients if token}
        self.by_name = {cn: policy for policy, _, cn in clients if cn}
        self.allow_anonymous = allow_anonymous

    @classmethod
    def load(cls, path: Path) -> Authenticator:
        """Parse and check the file; ValueError says what is wrong and where."""
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("clients", []), list):
            raise ValueError(f"{path}: expected {{\"clients\": [...], \"allow_anonymous\": false}}")
        clients = []
        for i, entry in enumerate(doc.get("clients", [])):
            where = f"clients[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError(f"{where}: needs a non-empty \"name\"")
            unknown = set(entry) - _FIELDS
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_FIELDS)})")
            token = str(entry.get("token_sha256", "")).lower()
            if token and (len(token) != 64 or any(c not in "0123456789abcdef" for c in token)):
                raise ValueError(f"{where}.token_sha256: must be 64 hex digits (sha256 of the token)")
            common_name = str(entry.get("mtls_common_name", ""))
            if not token and not common_name:
                raise ValueError(f"{where}: give token_sha256 or mtls_common_name")
            controllers = entry.get("controllers", "*")
            names_ok = isinstance(controllers, list) and all(isinstance(c, str) for c in controllers)
            if controllers != "*" and not names_ok:
                raise ValueError(f"{where}.controllers: \"*\" or a list of controller names")
            policy = ClientPolicy(entry["name"], None if controllers == "*" else frozenset(controllers),
                                  _positive(entry, "max_n", where), _positive(entry, "max_tokens", where),
                                  _positive(entry, "max_concurrent_runs", where))
            clients.append((policy, token, common_name))
        return cls(clients, bool(doc.get("allow_anonymous", False)))

    def identify(self, context: grpc.aio.ServicerContext) -> ClientPolicy:
        """The caller's policy, from its bearer token or its client certificate; UNAUTHENTICATED otherwise."""
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise StatusError(grpc.StatusCode.UNAUTHENTICATED, "authorization: expected 'Bearer <token>'")
            digest = hashlib.sha256(token.strip().encode()).hexdigest()
            for known, policy in self.by_token.items():
                if hmac.compare_digest(known, digest):
                    return policy
            raise StatusError(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown token")
        for name in context.auth_context().get("x509_common_name", []):
            policy = self.by_name.get(name.decode(errors="replace"))
            if policy is not None:
                return policy
        if self.allow_anonymous:
            return ClientPolicy("anonymous")
        raise StatusError(grpc.StatusCode.UNAUTHENTICATED,
                          "send 'authorization: Bearer <token>' metadata or a client certificate this router knows")


def identify(context: grpc.aio.ServicerContext, auth: Authenticator | None) -> ClientPolicy:
    """Who is calling: an authenticated client when --auth-file is set (UNAUTHENTICATED otherwise), else an
    open policy named by the x-trellis-client metadata or the peer's host, for per-client limits."""
    if auth is not None:
        return auth.identify(context)
    for key, value in context.invocation_metadata() or ():
        if key == "x-trellis-client":
            return ClientPolicy(value)
    return ClientPolicy((context.peer() or "").rsplit(":", 1)[0])
