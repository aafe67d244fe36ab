"""`trellis`: run controllers on a Trellis router and watch them stream.

    trellis run --controller majority_vote --n 8 "What is 12 + 7?"
    trellis controllers
    trellis eval --controllers native_generation,majority_vote --budgets 1,4,16 --limit 30
    trellis up --cpu-workers 2        # a router and two CPU workers on loopback, until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from client import eval as eval_cmd
from client import up as up_cmd
from trellis_client import Client, Delta, Event, Final, Intermediate, Progress, Result, Sampling, Started, TrellisError
from trellis_rpc.telemetry import configure_tracing, shutdown_telemetry, trace_ids, tracer
from trellis_rpc.tls import ClientTLS

DEFAULT_ROUTER = os.environ.get("TRELLIS_ROUTER", "127.0.0.1:50051")


def client_tls(args: argparse.Namespace) -> ClientTLS | None:
    """TLS when --tls-ca (or a client certificate) is given, else plaintext."""
    if not (args.tls_ca or args.tls_cert):
        return None
    return ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def open_client(args: argparse.Namespace) -> Client:
    """A client of --router; the bearer token is --token, else TRELLIS_TOKEN (which Client reads itself)."""
    return Client(args.router, tls=client_tls(args), token=args.token or None)


def run_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """`trellis run`'s flags as Client.stream's arguments."""
    params = json.loads(args.params) if args.params else {}
    if args.n is not None:
        params["n"] = args.n
    sampling = Sampling(max_tokens=args.max_tokens, stop=args.stop or [], temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed)
    return {"controller": args.controller, "prompt": args.prompt, "params": params, "sampling": sampling,
            "model": args.model, "raw": args.raw, "system": args.system}


def error_line(err: TrellisError) -> str:
    named = not err.field or err.message.startswith(err.field)
    return f"error: {err.code.name}: {err.message}" + ("" if named else f" (field: {err.field})")


class ProgressPrinter:
    """Prints events as they arrive: progress and votes as lines, token streams as a live count
    (or the text itself when there is only one branch)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.tokens: dict[str, int] = {}
        self.single_branch_text = False
        self.last_status = 0.0

    def _line(self, elapsed_ms: float, text: str) -> None:
        if self.single_branch_text:
            self.out.write("\n")
            self.single_branch_text = False
        self.out.write(f"[{elapsed_ms / 1000:6.2f}s] {text}\n")
        self.out.flush()

    def event(self, ev: Event, controller: str) -> None:
        if isinstance(ev, Started):
            self._line(ev.elapsed_ms, f"run {ev.run_id[:8]} started: {ev.controller} {ev.params}")
        elif isinstance(ev, Progress):
            self._line(ev.elapsed_ms, f"{ev.stage}: {ev.message} ({ev.tasks_done}/{ev.tasks_total})")
        elif isinstance(ev, Intermediate):
            tally = ev.details.get("votes")
            self._line(ev.elapsed_ms, f"{ev.kind} {ev.branch} -> {ev.answer!r}" + (f"  tally {tally}" if tally else ""))
        elif isinstance(ev, Delta):
            self._delta(ev, controller)
        elif isinstance(ev, Final):
            self.result(ev.result)

    def _delta(self, ev: Delta, controller: str) -> None:
        self.tokens[ev.branch] = self.tokens.get(ev.branch, 0) + ev.token_count
        if controller == "native_generation":
            self.single_branch_text = True
            self.out.write(ev.text)
            self.out.flush()
            return
        total = sum(self.tokens.values())
        if self.tty:
            self.out.write(f"\r[{ev.elapsed_ms / 1000:6.2f}s] streaming {len(self.tokens)} branches, {total} tokens")
            self.out.flush()
        elif ev.elapsed_ms - self.last_status >= 1000:
            self.last_status = ev.elapsed_ms
            self._line(ev.elapsed_ms, f"streaming {len(self.tokens)} branches, {total} tokens")

    def result(self, r: Result) -> None:
        if self.tty and self.tokens:
            self.out.write("\n")
        details = r.details
        out = self.out
        out.write("\n")
        if r.controller == "majority_vote":
            votes = dict(sorted(details.get("votes", {}).items(), key=lambda kv: -kv[1]))
            top = votes.get(r.answer, 0)
            share = details.get("share", 0.0)
            out.write(f"answer: {r.answer!r}  ({int(top)} of {len(r.candidates)} votes, {share:.0%})\n")
            out.write(f"votes:  {votes}\n")
            out.write(f"winning sample: {r.text.strip()!r}\n")
        else:
            out.write(f"answer: {r.answer.strip()!r}\n")
        u, t = r.usage, r.timings
        out.write(f"tokens: prompt {u.prompt_tokens}, completion {u.completion_tokens} in {u.tasks} worker task(s)\n")
        out.write(f"timings: first token {t.ttft_ms:.0f} ms, total {t.total_ms:.0f} ms"
                  + (f", {u.completion_tokens / (t.total_ms / 1000):.1f} tokens/s\n" if t.total_ms else "\n"))
        out.flush()


def cmd_run(args: argparse.Namespace) -> int:
    """With OTEL_TRACES_EXPORTER set, the run is traced from here: the client library carries this span's
    context on the call, so the router's spans join its trace."""
    run = run_arguments(args)
    printer = ProgressPrinter(sys.stdout)
    configure_tracing("client")
    try:
        with tracer("trellis.client").start_as_current_span("client.run", attributes={
                "trellis.controller": args.controller}), open_client(args) as client:
            ids = trace_ids()
            try:
                with client.stream(**run, deadline=args.timeout) as events:
                    for ev in events:
                        printer.event(ev, args.controller)
            except TrellisError as err:
                print(f"\n{error_line(err)}", file=sys.stderr)
                return 1
            finally:
                if ids is not None:
                    print(f"(trace {ids[0]})")
    finally:
        shutdown_telemetry()
    return 0


def cmd_controllers(args: argparse.Namespace) -> int:
    try:
        with open_client(args) as client:
            controllers = client.controllers(deadline=args.timeout)
    except TrellisError as err:
        print(error_line(err), file=sys.stderr)
        return 1
    for c in controllers:
        print(f"{c.name}: {c.description}")
        for p in c.params:
            print(f"    {p.name} ({p.type}, default {p.default!r}): {p.description}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trellis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", help=f"router host:port (env TRELLIS_ROUTER, default {DEFAULT_ROUTER})")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    p.add_argument("--token", default="", help="bearer token for a router with --auth-file (env TRELLIS_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="dial the router over TLS, verifying it with this CA (PEM)")
    p.add_argument("--tls-cert", type=Path, help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="mutual TLS: its private key (PEM)")
    p.add_argument("--tls-server-name", default="", help="the name in the router's certificate, if not the host")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a controller and stream its progress")
    run.add_argument("prompt")
    run.add_argument("--controller", default="majority_vote")
    run.add_argument("--n", type=int, help="samples (controller parameter n)")
    run.add_argument("--params", help='other controller parameters as JSON, e.g. \'{"extractor": "boxed"}\'')
    run.add_argument("--system", default="", help="system message (chat prompts)")
    run.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    run.add_argument("--model", default="", help="worker pool model id (default: any)")
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float)
    run.add_argument("--top-p", type=float)
    run.add_argument("--top-k", type=int)
    run.add_argument("--min-p", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--stop", action="append", help="stop string (repeatable)")
    run.set_defaults(func=cmd_run)

    controllers = sub.add_parser("controllers", help="list controllers and their parameters")
    controllers.set_defaults(func=cmd_controllers)

    eval_cmd.add_parser(sub)
    up_cmd.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.router_given = args.router is not None
    args.router = args.router or DEFAULT_ROUTER
    started = time.monotonic()
    code = args.func(args)
    if args.command == "run":
        print(f"(client wall time {time.monotonic() - started:.1f} s)")
    sys.exit(code)
