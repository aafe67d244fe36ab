"""`trellis eval`: run controllers over the shipped arithmetic set through a router and report
accuracy, tokens generated and wall time per controller and sample budget N.

    trellis eval --controllers native_generation,majority_vote --budgets 1,4,16 --limit 30
    trellis eval --router 127.0.0.1:50051 ...     # an existing router; otherwise one is started here

Without --router it starts a CPU worker (the bundled SmolLM2-135M-Instruct) and a router as local
processes, like `make demo`, and stops them at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trellis_client import Client, Sampling, TrellisError

DATASET = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "arith.jsonl"
INSTRUCTION = "Answer with the final number."

# How a sample budget N becomes controller parameters: controllers with an `n` parameter take n=N;
# the searches spend N on their own knobs. native_generation is the one-sample baseline.
SEARCH = {"kind": "verifier", "max_step_tokens": 48, "max_steps": 6}   # SmolLM2 verifies its own steps
BUDGETS: dict[str, object] = {
    "native_generation": lambda n: {} if n == 1 else None,
    "dynasor_cot": lambda n: {"max_tokens": 96, "probe_interval": 32} if n == 1 else None,  # one chain
    "deepconf_online": lambda n: {"n": n, "warmup": min(4, n)},
    "beam_search": lambda n: {"beam_width": max(1, n // 4), "expansions": min(n, 4), **SEARCH},
    "best_first_search": lambda n: {"max_expansions": n, **SEARCH},
    "mcts": lambda n: {"iterations": n, **SEARCH},
    "tree_of_thoughts": lambda n: {"breadth": min(n, 4), "beam": max(1, n // 4), "depth": 3, "max_step_tokens": 48},
}

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_number(text: str) -> str:
    """The answer a reader would take from text: \\boxed{...} if present, else the last number."""
    boxed = text.rfind("\\boxed{")
    if boxed != -1:
        found = _NUMBER.search(text[boxed:])
    else:
        found = next(reversed(list(_NUMBER.finditer(text))), None)
    if not found:
        return ""
    value = float(found.group().replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass
class Outcome:
    correct: bool
    tokens: int
    wall_ms: float
    error: str = ""


@dataclass
class Cell:
    controller: str
    budget: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(o.correct for o in self.outcomes) / max(1, len(self.outcomes))

    @property
    def tokens(self) -> float:
        return statistics.mean(o.tokens for o in self.outcomes) if self.outcomes else 0.0

    @property
    def tokens_per_solved(self) -> float:
        solved = sum(o.correct for o in self.outcomes)
        return sum(o.tokens for o in self.outcomes) / solved if solved else float("inf")

    @property
    def latency_ms(self) -> float:
        return statistics.median(o.wall_ms for o in self.outcomes) if self.outcomes else 0.0

    @property
    def errors(self) -> int:
        return sum(bool(o.error) for o in self.outcomes)


def load_problems(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def controller_params(client: Client, timeout: float) -> dict[str, set[str]]:
    return {c.name: {p.name for p in c.params} for c in client.controllers(deadline=timeout)}


def split_spec(spec: str) -> tuple[str, dict]:
    """"majority_vote?stop_decided=false&extractor=boxed" -> the controller and the parameters it fixes, so one
    eval compares a controller with itself under other settings (the gateway's model-field syntax)."""
    name, _, query = spec.partition("?")
    fixed: dict = {}
    for pair in filter(None, query.split("&")):
        key, _, raw = pair.partition("=")
        fixed[key] = _typed(raw)
    return name, fixed


def _typed(raw: str) -> bool | int | float | str:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def params_for(controller: str, budget: int, known: set[str]) -> dict | None:
    """Controller parameters for budget N, or None when the pair is not evaluated."""
    rule = BUDGETS.get(controller)
    if rule is not None:
        return rule(budget)
    return {"n": budget} if "n" in known else (None if budget > 1 else {})


def run_one(client: Client, controller: str, params: dict, problem: dict, args: argparse.Namespace,
            seed: int) -> Outcome:
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, seed=seed)
    started = time.monotonic()
    try:
        result = client.run(controller, f"{problem['question']} {INSTRUCTION}", params=params, sampling=sampling,
                            deadline=args.timeout)
    except TrellisError as err:
        return Outcome(False, 0, (time.monotonic() - started) * 1000, f"{err.code.name}: {err.message}")
    return Outcome(answer_number(result.answer) == problem["answer"], result.usage.completion_tokens,
                   result.timings.total_ms)


def evaluate(router: str, args: argparse.Namespace) -> list[Cell]:
    problems = load_problems(args.dataset, args.limit)
    cells: list[Cell] = []
    # One client for all the threads (Client is thread-safe); the token is --token, else TRELLIS_TOKEN.
    with Client(router, token=args.token or None) as client:
        known = controller_params(client, args.timeout)
        for spec in args.controllers:
            controller, fixed = split_spec(spec)
            if controller not in known:
                raise SystemExit(f"unknown controller {controller!r} (router has: {', '.join(sorted(known))})")
            for budget in args.budgets:
                params = params_for(controller, budget, known[controller])
                if params is None:
                    continue
                params |= fixed
                cell = Cell(spec, budget)
                started = time.monotonic()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    cell.outcomes = list(pool.map(
                        run_one, [client] * len(problems), [controller] * len(problems), [params] * len(problems),
                        problems, [args] * len(problems), [args.seed + i for i in range(len(problems))]))
                cell.wall_s = time.monotonic() - started
                cells.append(cell)
                print(f"{spec:>24} N={budget:<3} accuracy {cell.accuracy:6.1%}  tokens/problem "
                      f"{cell.tokens:7.1f}  tokens/solved {cell.tokens_per_solved:7.1f}  "
                      f"latency p50 {cell.latency_ms / 1000:6.2f} s  wall {cell.wall_s:6.1f} s"
                      + (f"  errors {cell.errors}" if cell.errors else ""), flush=True)
    return cells


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def markdown(cells: list[Cell], args: argparse.Namespace, command: str) -> str:
    base = next((c for c in cells if c.controller == "native_generation" and c.budget == 1), None)
    lines = [
        f"Command: `{command}`", "",
        f"{len(cells[0].outcomes) if cells else 0} problems from `{_shown(args.dataset)}` "
        f"(seeded generator `benchmarks/eval_data.py`), temperature {args.temperature}, at most {args.max_tokens} "
        f"new tokens per sample, {args.concurrency} runs in flight.", "",
        "| controller | N | accuracy | vs single sample | tokens / problem | vs single sample | latency p50 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        d_acc = f"{(c.accuracy - base.accuracy) * 100:+.1f} pts" if base else "-"
        d_tok = f"{c.tokens / base.tokens:.1f}x" if base and base.tokens else "-"
        lines.append(f"| {c.controller} | {c.budget} | {c.accuracy:.1%} | {d_acc} | {c.tokens:.0f} | {d_tok} | "
                     f"{c.latency_ms / 1000:.2f} s | {c.errors} |")
    return "\n".join(lines) + "\n"


def start_local(args: argparse.Namespace):
    from client.launcher import start_router, start_worker

    log_dir = Path(tempfile.mkdtemp(prefix="trellis-eval-"))
    worker = start_worker(args.model, log_dir, extra=["--dtype", args.dtype])
    worker.wait_serving(timeout=300)
    router = start_router([worker.address], log_dir, extra=["--max-n", str(max(args.budgets))])
    router.wait_serving(timeout=60)
    return worker, router


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy / tokens / time of controllers on the shipped arithmetic set")
    p.add_argument("--controllers", default="native_generation,majority_vote",
                   type=lambda s: [c for c in s.split(",") if c],
                   help="comma-separated; a controller may fix parameters, e.g. majority_vote?stop_decided=false")
    p.add_argument("--budgets", default="1,4,16", type=lambda s: [int(b) for b in s.split(",")],
                   help="sample budgets N")
    p.add_argument("--limit", type=int, default=0, help="first this many problems (0: all)")
    p.add_argument("--dataset", type=Path, default=DATASET)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=8, help="runs in flight")
    p.add_argument("--model", default="default", help="worker model when starting one here")
    p.add_argument("--dtype", default="auto", help="worker dtype when starting one here (auto: what the CPU runs)")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--json", type=Path, help="write per-cell results here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import sys

    command = "trellis " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("trellis") else \
        "python -m client " + " ".join(sys.argv[1:])
    procs = ()
    router = args.router
    if not args.router_given:
        procs = start_local(args)
        router = procs[1].address
    try:
        cells = evaluate(router, args)
    finally:
        for proc in reversed(procs):
            proc.stop()
    table = markdown(cells, args, command)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps([{"controller": c.controller, "budget": c.budget, "accuracy": c.accuracy,
                                          "tokens": c.tokens, "latency_ms": c.latency_ms, "wall_s": c.wall_s,
                                          "errors": c.errors} for c in cells], indent=1))
    return 0
