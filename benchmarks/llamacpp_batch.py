"""llama.cpp as a benchmark system: continuous batching over its C API, as llama-server's parallel slots do.

Used by benchmarks/engine.py (systems `llamacpp` and `llamacpp_single`), in its own child process. The bindings
come from llama-cpp-python built once into .cache/llamacpp-venv (`make llamacpp`; it compiles llama.cpp for
several minutes, with the CPU's own instruction set), which is not a runtime dependency of Trellis: this module
adds that venv's site-packages to sys.path.

Each step is one llama_decode over one token of every running sequence plus prompt tokens of waiting ones, up
to the token budget (llama-server's default batch, 512 here as in the Trellis engine); every sequence samples
with llama.cpp's own sampler (temperature 1, no top-k / top-p: the `dist` sampler over the full softmax), in C.
The model is the bundled .gguf itself (Q4_1 weights, llama.cpp's quantized kernels), one unified KV cache.
"""

from __future__ import annotations

import glob
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV = Path(__file__).resolve().parent.parent / ".cache" / "llamacpp-venv"


def import_llama_cpp():
    sites = glob.glob(str(VENV / "lib" / "python3*" / "site-packages"))
    if not sites or not (VENV / ".installed").exists():
        raise RuntimeError(f"llama.cpp is not built: run `make llamacpp` (builds llama-cpp-python into {VENV}, "
                           "several minutes, once)")
    sys.path.append(sites[0])  # after our own packages: only llama_cpp itself comes from there
    import llama_cpp

    return llama_cpp


@dataclass
class _Seq:
    sid: int
    prompt: list[int]
    start: float
    fed: int = 0                        # prompt tokens decoded so far
    pos: int = 0
    last: int = -1                      # the token to feed next once the prompt is in
    times: list[float] = field(default_factory=list)


class LlamaCppBatch:
    def __init__(self, gguf: Path, threads: int, max_seqs: int, ctx_tokens: int, budget: int = 512,
                 seed: int = 0) -> None:
        self.ll = ll = import_llama_cpp()
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), mparams)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = ctx_tokens
        cparams.n_batch = cparams.n_ubatch = budget
        cparams.n_seq_max = max_seqs
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp: could not create a context")
        self.budget = budget
        self.batch = ll.llama_batch_init(budget, 0, 1)
        self.sampler = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(self.sampler, ll.llama_sampler_init_dist(seed))

    def _add(self, n: int, token: int, pos: int, sid: int, logits: bool) -> None:
        b = self.batch
        b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, logits
        b.seq_id[n][0] = sid

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[tuple[float, list[float]]]:
        """Generate new_tokens for every prompt, all submitted at once; per prompt (submit time, token times)."""
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        now = time.perf_counter()
        waiting = [_Seq(i, p, now) for i, p in enumerate(prompts)]
        running: list[_Seq] = []
        done: list[_Seq] = []
        while waiting or running:
            n, rows = 0, []                     # rows: (sequence, batch index of its logits)
            for seq in running:
                self._add(n, seq.last, seq.pos, seq.sid, True)
                rows.append((seq, n))
                n += 1
            while waiting and n < self.budget:
                seq = waiting[0]
                take = min(len(seq.prompt) - seq.fed, self.budget - n)
                for j in range(take):
                    end = seq.fed + j == len(seq.prompt) - 1
                    self._add(n, seq.prompt[seq.fed + j], seq.fed + j, seq.sid, end)
                    if end:
                        rows.append((seq, n))
                    n += 1
                seq.fed += take
                seq.pos = seq.fed
                if seq.fed == len(seq.prompt):
                    running.append(waiting.pop(0))
            self.batch.n_tokens = n
            if ll.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")
            t = time.perf_counter()
            for seq, index in rows:
                seq.last = ll.llama_sampler_sample(self.sampler, self.ctx, index)
                if seq.times:
                    seq.pos += 1
                seq.times.append(t)
                if len(seq.times) == new_tokens:
                    running.remove(seq)
                    done.append(seq)
        return [(s.start, s.times) for s in sorted(done, key=lambda s: s.sid)]

    def close(self) -> None:
        ll = self.ll
        ll.llama_sampler_free(self.sampler)
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


def gguf_path() -> Path:
    from torch_engine.model_loader import bundled_gguf

    return bundled_gguf()

