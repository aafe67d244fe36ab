"""The router's settings: every flag of `python -m router`, in sections, with defaults and bounds in one place.
Reloadable without a restart (SIGHUP or a change of the config file or the auth file): the auth file, the
admission limits and the worker list."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from trellis_settings import Section, setting
from trellis_settings.common import ServerTLS, Telemetry, client_tls


class Server(Section):
    host: str = setting("127.0.0.1", "interface to serve on", flag="host")
    port: int = setting(50051, "0 picks a free port (printed in the 'serving' log line)", flag="port", ge=0,
                        le=65535)
    drain_seconds: float = setting(30.0, "grace period for in-flight runs on SIGTERM", flag="drain_seconds", ge=0)


class Discovery(Section):
    workers: str = setting("", "comma-separated workers: host:port, dns:NAME:PORT (re-resolved, e.g. a Kubernetes "
                           "headless service) or file:PATH (re-read; one host:port per line)", flag="workers",
                           env="TRELLIS_WORKERS", reload=True)
    discovery_interval: float = setting(5.0, "seconds between re-resolving dns: and file: workers",
                                        flag="discovery_interval", gt=0)
    worker_wait_seconds: float = setting(2.0, "how long a task waits for a worker to connect before UNAVAILABLE "
                                         "(capped by its deadline)", flag="worker_wait_seconds", ge=0)


class Routing(Section):
    routing: Literal["kv", "least_loaded", "round_robin"] = setting(
        "kv", "kv: weigh KV-prefix overlap against load; least_loaded; round_robin", flag="routing")
    overlap_weight: float = setting(1.0, "kv routing: cost of a prompt block to prefill, against one block of load",
                                    flag="overlap_weight", ge=0)
    max_migrations: int = setting(2, "times a generate task moves to another worker when its worker fails "
                                  "mid-stream", flag="max_migrations", ge=0)


class Reallocation(Section):
    reallocate: Literal["off", "certaindex"] = setting(
        "off", "certaindex: while runs wait for admission or tasks wait at workers, votes stop once their leader is "
        "ahead with the given certainty, freeing capacity for undecided runs (can change answers; a vote that can "
        "no longer be overtaken stops whatever this says)", flag="reallocate")
    certainty: float = setting(0.95, "certaindex: how sure a vote must be of its leader (Adaptive-Consistency's Beta "
                               "criterion)", flag="certainty", ge=0.5, le=1.0)


class Admission(Section):
    max_running_runs: int = setting(256, "runs worked on at once; more wait in a priority queue (0: no limit)",
                                    flag="max_running_runs", ge=0, reload=True)
    max_queued_runs: int = setting(1024, "runs that may wait; beyond, RESOURCE_EXHAUSTED", flag="max_queued_runs",
                                   ge=0, reload=True)
    max_runs_per_client: int = setting(0, "runs in flight per client (x-trellis-client metadata, else peer host); "
                                       "0: no limit", flag="max_runs_per_client", ge=0, reload=True)


class Limits(Section):
    max_n: int = setting(64, "largest n a run or a generate call may ask for", flag="max_n", ge=1)
    max_tokens: int = setting(0, "largest max_tokens of one generate task (0: no limit)", flag="max_tokens", ge=0)
    max_prompt_chars: int = setting(1_000_000, "largest prompt in characters (token ids count one each); 0: no limit",
                                    flag="max_prompt_chars", ge=0)
    max_run_seconds: float = setting(0.0, "longest a run may take, whatever deadline the client sets (0: the "
                                     "client's deadline)", flag="max_run_seconds", ge=0)
    max_tasks_per_run: int = setting(10_000, "tasks one run may start (bounds a search tree); 0: no limit",
                                     flag="max_tasks_per_run", ge=0)


class Auth(Section):
    auth_file: Path | None = setting(None, "clients allowed in (token hashes or mTLS names) and their limits; JSON, "
                                     "see router/auth.py; re-read on SIGHUP or when it changes", flag="auth_file",
                                     reload=True)


WorkerTLS = client_tls("worker-", "workers")


class RouterSettings(Section):
    server: Server = Server()
    tls: ServerTLS = ServerTLS()
    discovery: Discovery = Discovery()
    worker_tls: WorkerTLS = WorkerTLS()
    routing: Routing = Routing()
    reallocation: Reallocation = Reallocation()
    admission: Admission = Admission()
    limits: Limits = Limits()
    auth: Auth = Auth()
    telemetry: Telemetry = Telemetry()
