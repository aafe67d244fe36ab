"""`make demo`: a worker and a router as separate processes on loopback, majority vote (n=8) over one
arithmetic question on the bundled SmolLM2-135M-Instruct, streamed through the gRPC client."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from client import cli
from client.launcher import start_router, start_worker

QUESTION = "What is 9 times 3?"


def main() -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="trellis-demo-"))
    print(f"starting worker_cpu (SmolLM2-135M-Instruct, int8 weights, compiled decode step; the first start "
          f"converts the bundled .gguf and compiles, ~1 minute on 2 cores, later starts reuse both) and router; "
          f"logs in {log_dir}", flush=True)
    started = time.monotonic()
    worker = start_worker("default", log_dir)
    router = None
    try:
        worker.wait_serving(timeout=300)
        router = start_router([worker.address], log_dir)
        router.wait_serving(timeout=60)
        print(f"worker pid {worker.popen.pid} on {worker.address}, router pid {router.popen.pid} on "
              f"{router.address} (ready in {time.monotonic() - started:.1f} s)\n", flush=True)
        print(f"$ trellis --router {router.address} run --controller majority_vote --n 8 {QUESTION!r}\n", flush=True)
        args = cli.parser().parse_args(["--router", router.address, "run", "--controller", "majority_vote",
                                        "--n", "8", "--temperature", "0.5", "--seed", "7", QUESTION])
        return cli.cmd_run(args)
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()
        print("\nstopped router and worker", flush=True)


if __name__ == "__main__":
    sys.exit(main())
