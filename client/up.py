"""`trellis up`: the cluster's topology as local processes on loopback.

    trellis up --cpu-workers 2                      # router on 127.0.0.1:50051 plus two CPU workers
    trellis up --cpu-workers 2 --metrics 9464       # Prometheus endpoints on 9464 (router), 9465, 9466
    trellis up --gateway-port 8080                  # also the OpenAI-compatible gateway: http://127.0.0.1:8080/v1
    trellis up --model ./my-hf-model --worker-arg=--dtype=float32 --router-arg=--routing=round_robin
    trellis up --config trellis.toml                # every process's settings from one file (docs/CONFIGURATION.md)

Discovery works as in Kubernetes (deploy/k8s): the router is given `--workers file:PATH` and re-reads
that file every `--discovery-interval` seconds; a worker's address is written there once the worker
answers SERVING on grpc.health.v1 (what a readiness probe does for a headless Service) and removed
when its process exits.

--gateway-port PORT (0 or absent: none) also starts `python -m gateway`, the OpenAI-compatible HTTP
gateway, on 127.0.0.1:PORT as a client of the router, once the router serves; it is up when its GET /health
answers 200 (what its readiness probe asks in Kubernetes). With --metrics it serves Prometheus metrics on
the port after the last worker's.

--config FILE passes `--config FILE` to the router, every worker and the gateway: each reads its own table
([router.*], [worker_cpu.*], [gateway.*]) as it would in Kubernetes. What `up` itself decides stays a flag,
and flags win over the file: every host (loopback) and port (metrics too: none without --metrics), the
discovery file and its re-read interval, --model, --threads, the worker ids and --drain-seconds. Everything
else (admission limits, routing, the gateway's max_choices, the workers' engine sizes, ...) comes from the file;
--router-arg/--worker-arg/--gateway-arg still win over both. The router reloads its admission limits (and auth
file) when the file changes, as it does in the cluster; its worker list stays the discovery file.

Ctrl-C (or SIGTERM) stops the gateway first (it drains its open requests), then drains the router, then
the workers, and waits for all of them to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from client.launcher import Process, free_port, start_gateway, start_router, start_worker

SAMPLE_PROMPT = "What is 15 + 27?"
# What the stop waits beyond --drain-seconds for a process to flush and exit before SIGKILL.
EXIT_MARGIN_S = 10.0


@dataclass
class Stack:
    """The processes `up` started, in start order, and the discovery file the router reads."""

    listing: Path
    workers: list[Process] = field(default_factory=list)
    router: Process | None = None
    gateway: Process | None = None
    ready: list[Process] = field(default_factory=list)  # workers written to the listing
    metrics: dict[str, int] = field(default_factory=dict)  # process name -> metrics port

    @property
    def processes(self) -> list[Process]:
        """In the order `stop` stops them."""
        return [p for p in (self.gateway, self.router, *self.workers) if p is not None]

    def write_listing(self) -> None:
        """Rewrite atomically: the router may read the file at any moment."""
        lines = ["# written by `trellis up`: the workers that are serving", *(w.address for w in self.ready)]
        tmp = self.listing.with_name(self.listing.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.listing)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a router and N CPU workers on loopback (the cluster's topology)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-workers", type=int, default=1, help="CPU worker processes (default 1)")
    p.add_argument("--model", default="default",
                   help="every worker's --model: a Hugging Face directory, a .gguf, or 'default' (bundled SmolLM2)")
    p.add_argument("--router-port", type=int, default=50051, help="the router's port (0: a free one)")
    p.add_argument("--gateway-port", type=int, default=0, metavar="PORT",
                   help="also start the OpenAI-compatible HTTP gateway on this port (0, the default: none)")
    p.add_argument("--metrics", type=int, nargs="?", const=0, default=None, metavar="FIRST_PORT",
                   help="serve Prometheus metrics: the router on FIRST_PORT, worker i on FIRST_PORT+i, the "
                        "gateway after the last worker (no value: free ports)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (0: this machine's cores split between the workers)")
    p.add_argument("--drain-seconds", type=float, default=10.0, help="every process's drain on stop")
    p.add_argument("--discovery-interval", type=float, default=1.0,
                   help="seconds between the router's re-reads of the discovery file")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every worker, repeatable; write it with '=': --worker-arg=--dtype=float32")
    p.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the router, repeatable: --router-arg=--routing=round_robin")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the gateway, repeatable: --gateway-arg=--max-choices=32")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="settings file (TOML) for the router, the workers and the gateway, each reading its own table; "
                        "the hosts, ports, discovery, --model, --threads and --drain-seconds `up` sets win over it")
    p.add_argument("--log-dir", type=Path, help="where the processes' logs go (default: a new temporary directory)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds a worker may take to load its model (the first start on the bundled model "
                        "converts it, ~25 s)")
    p.set_defaults(func=cmd_up)


def port_is_free(port: int) -> bool:
    """A router that cannot bind exits, but a health check could meanwhile reach whatever holds the port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def threads_per_worker(requested: int, workers: int) -> int:
    """torch sizes its pool to all cores by default; N workers doing that would oversubscribe N times."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def metrics_port(first: int | None, index: int) -> int:
    """index 0 is the router, i the i-th worker (the gateway: the one after the last); 0 when metrics are off."""
    if first is None:
        return 0
    return first + index if first else free_port()


def common_args(args: argparse.Namespace, metrics: int) -> list[str]:
    """What every process gets from `up`: the settings file, loopback, and the metrics port `up` chose (0: none,
    whatever the file says, or N workers reading one file would all take the same port)."""
    own = ["--config", str(args.config)] if args.config else []
    own += ["--host", "127.0.0.1", "--drain-seconds", str(args.drain_seconds), "--metrics-port", str(metrics)]
    if metrics:
        own += ["--metrics-host", "127.0.0.1"]
    return own


def worker_args(args: argparse.Namespace, index: int, metrics: int) -> list[str]:
    own = ["--worker-id", f"worker-{index}", "--threads", str(threads_per_worker(args.threads, args.cpu_workers))]
    return common_args(args, metrics) + own + args.worker_arg  # the user's come last: argparse keeps the last given


def router_args(args: argparse.Namespace, metrics: int) -> list[str]:
    own = ["--discovery-interval", str(args.discovery_interval)]
    return common_args(args, metrics) + own + args.router_arg


def gateway_args(args: argparse.Namespace, metrics: int) -> list[str]:
    return common_args(args, metrics) + args.gateway_arg


def gateway_url(gateway: Process) -> str:
    return f"http://{gateway.address}/v1"


def discovered(router: Process, source: str) -> set[str]:
    """The addresses the router last said it found in `source` (its JSON 'workers discovered' log line)."""
    found: set[str] = set()
    try:
        lines = router.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "workers discovered" and event.get("source") == source:
            found = set(event.get("addresses") or ())
    return found


def wait_discovered(stack: Stack, interval_s: float) -> bool:
    """Until the router has read every ready worker from the listing (a few re-reads at most)."""
    assert stack.router is not None
    want = {w.address for w in stack.ready}
    deadline = time.monotonic() + max(5.0, 5 * interval_s)
    while time.monotonic() < deadline:
        if want <= discovered(stack.router, f"file:{stack.listing}"):
            return True
        time.sleep(0.1)
    return False


def say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP: the terminal went away) stop `up` the way Ctrl-C does. SIGINT too, explicitly:
    a process started in the background of a non-interactive shell inherits SIGINT ignored, and Python
    then leaves it ignored, so Ctrl-C (or a supervisor's SIGINT) would do nothing."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start(args: argparse.Namespace, stack: Stack, log_dir: Path, router_port: int) -> None:
    """Workers first (they take longest), then the router on the empty listing, then the gateway (if asked
    for), then each worker into the listing as it turns SERVING. Appends to `stack` as it goes, so a failure
    midway stops what ran."""
    threads = threads_per_worker(args.threads, args.cpu_workers)
    gateway = " + gateway" if args.gateway_port else ""
    settings = f"; settings from {args.config}" if args.config else ""
    say(f"trellis up: router{gateway} + {args.cpu_workers} CPU worker(s), model {args.model}, {threads} torch "
        f"thread(s) each{settings}; logs in {log_dir}")
    for i in range(1, args.cpu_workers + 1):
        port = metrics_port(args.metrics, i)
        worker = start_worker(args.model, log_dir, extra=worker_args(args, i, port), name=f"worker-{i}")
        stack.workers.append(worker)
        if port:
            stack.metrics[worker.name] = port
        say(f"  {worker.name:<9} {worker.address:<16} pid {worker.popen.pid}  loading")
    stack.write_listing()
    port = metrics_port(args.metrics, 0)
    stack.router = start_router([f"file:{stack.listing}"], log_dir, port=router_port, extra=router_args(args, port))
    if port:
        stack.metrics[stack.router.name] = port
    stack.router.wait_serving(timeout=60)
    say(f"  {stack.router.name:<9} {stack.router.address:<16} pid {stack.router.popen.pid}  serving, "
        f"discovery file:{stack.listing} (re-read every {args.discovery_interval:g} s)")
    if args.gateway_port:
        # Its GET /health answers 200 once the router serves, which it does: up in a second or two, while the
        # workers go on loading.
        port = metrics_port(args.metrics, args.cpu_workers + 1)
        stack.gateway = start_gateway(stack.router.address, log_dir, port=args.gateway_port,
                                      extra=gateway_args(args, port))
        if port:
            stack.metrics[stack.gateway.name] = port
        stack.gateway.wait_serving(timeout=60)
        say(f"  {stack.gateway.name:<9} {stack.gateway.address:<16} pid {stack.gateway.popen.pid}  serving, "
            f"OpenAI-compatible API at {gateway_url(stack.gateway)}")
    for worker in stack.workers:
        worker.wait_serving(timeout=args.startup_timeout)
        stack.ready.append(worker)
        stack.write_listing()
        say(f"  {worker.name:<9} {worker.address:<16} serving, added to the discovery file")


def print_ready(stack: Stack, started: float, found: bool) -> None:
    assert stack.router is not None
    address = stack.router.address
    if not found:
        say(f"  (the router has not logged discovering every worker yet; see {stack.router.log_path})")
    say(f"ready: router {address} with {len(stack.ready)} CPU worker(s) ({time.monotonic() - started:.1f} s)\n")
    say(f"  trellis --router {address} run --controller majority_vote --n 8 {SAMPLE_PROMPT!r}")
    say(f"  trellis --router {address} controllers")
    for name, port in stack.metrics.items():
        say(f"  metrics {name:<9} http://127.0.0.1:{port}/metrics")
    if stack.gateway is not None:
        url = gateway_url(stack.gateway)
        body = json.dumps({"model": "majority_vote?n=8", "messages": [{"role": "user", "content": SAMPLE_PROMPT}]})
        say(f"\nOpenAI-compatible gateway: {url}")
        say(f"  curl {url}/chat/completions -H 'content-type: application/json' -d '{body}'")
    say("\nCtrl-C stops everything.")


def supervise(stack: Stack) -> int:
    """Until interrupted: a worker that exits leaves the listing (like a pod that is no longer Ready);
    the router or the gateway exiting ends `up`."""
    assert stack.router is not None
    while True:
        time.sleep(0.5)
        for proc in (stack.router, stack.gateway):
            if proc is not None and proc.popen.poll() is not None:
                say(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
                return 1
        gone = [w for w in stack.ready if w.popen.poll() is not None]
        for worker in gone:
            stack.ready.remove(worker)
            say(f"{worker.name} exited with {worker.popen.returncode}; removed from the discovery file "
                f"(log: {worker.log_path})")
        if gone:
            stack.write_listing()
            if not stack.ready:
                say("no worker left: runs fail with UNAVAILABLE until you restart `trellis up`")


def terminate(procs: list[Process], timeout: float) -> None:
    """SIGTERM once (a second one could land while a process is exiting, after Python has put the default
    handler back, and kill it), then wait; SIGKILL what is still running at the deadline."""
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        proc.stop()  # it has exited: this closes its log


def stop(stack: Stack, drain_s: float) -> None:
    """The gateway first, so its open requests finish on a router that still serves; then the router, so
    its runs finish on workers that still serve; then every worker at once. A second Ctrl-C kills whatever
    is still running."""
    timeout = drain_s + EXIT_MARGIN_S
    try:
        if stack.gateway is not None:
            terminate([stack.gateway], timeout)
        if stack.router is not None:
            terminate([stack.router], timeout)
        terminate(stack.workers, timeout)
    except KeyboardInterrupt:
        for proc in stack.processes:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait()
            proc.stop()
    codes = ", ".join(f"{p.name} {p.popen.returncode}" for p in stack.processes)
    if codes:
        say(f"stopped ({codes})")


def cmd_up(args: argparse.Namespace) -> int:
    if args.cpu_workers < 1:
        say("trellis up: --cpu-workers must be at least 1")
        return 2
    router_port = args.router_port or free_port()
    if not port_is_free(router_port):
        say(f"trellis up: port {router_port} is in use (another router?); choose one with --router-port")
        return 2
    if args.gateway_port < 0 or args.gateway_port == router_port:
        say(f"trellis up: --gateway-port {args.gateway_port}: a port other than the router's, or 0 for no gateway")
        return 2
    if args.gateway_port and not port_is_free(args.gateway_port):
        say(f"trellis up: port {args.gateway_port} is in use; choose another with --gateway-port")
        return 2
    if args.config:
        # Each process checks its own table (and exits naming a bad setting); this catches only what would make
        # every one of them fail the same way, before anything starts.
        try:
            tomllib.loads(args.config.read_text())
        except OSError as err:
            say(f"trellis up: --config: cannot read {args.config}: {err.strerror or err}")
            return 2
        except tomllib.TOMLDecodeError as err:
            say(f"trellis up: --config: {args.config} is not valid TOML: {err}")
            return 2
        args.config = args.config.resolve()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="trellis-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(listing=log_dir / "workers")
    started = time.monotonic()
    with sigterm_as_interrupt():
        try:
            start(args, stack, log_dir, router_port)
            print_ready(stack, started, wait_discovered(stack, args.discovery_interval))
            return supervise(stack)
        except KeyboardInterrupt:
            say("\nstopping: " + ("draining the gateway, then " if stack.gateway else "draining ")
                + "the router, then the workers")
            return 0
        except (RuntimeError, TimeoutError) as err:  # a process died or did not come up: its log says why
            say(f"trellis up: {err}")
            return 1
        finally:
            stop(stack, args.drain_seconds)
