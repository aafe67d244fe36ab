"""The OpenAI-compatible worker's settings: every flag of `python -m worker_openai`, in sections, with defaults and
bounds in one place. Nothing reloads: a worker restarts to change them.

The upstream's API key is a setting without a flag (a key on a command line shows in `ps` and in manifests):
`TRELLIS_WORKER_OPENAI__UPSTREAM__API_KEY`, the older `TRELLIS_UPSTREAM_API_KEY`, or the config file; masked
wherever settings are shown. --api-key-file beats it, and OPENAI_API_KEY is read when none of them is set
(worker_openai.cli.api_key). The upstream kinds are written out here; tests/test_settings_workers.py checks that
they are worker_openai.sampling_fields.KINDS."""

from __future__ import annotations

from typing import Literal

from trellis_settings import Section, setting
from trellis_settings.common import ServerTLS, Telemetry, WorkerServer


class Upstream(Section):
    base_url: str = setting("", "the upstream's API root, e.g. http://vllm:8000/v1 (required)", flag="base_url")
    upstream_kind: Literal["llamacpp", "openai", "sglang", "transformers", "trtllm", "vllm"] = setting(
        "openai", "which server it is: decides the vendor extensions sent (top_k, min_p, ...) and what is refused "
        "with INVALID_ARGUMENT", flag="upstream_kind")
    model: str = setting("", "the upstream's model name (default: the first /models lists)", flag="model")
    api_key_file: str = setting("", "file holding the upstream's API key (else api_key, else the environment's "
                                "OPENAI_API_KEY)", flag="api_key_file")
    api_key: str = setting("", "the upstream's API key (no flag: give it by the environment, from a Secret)",
                           env="TRELLIS_UPSTREAM_API_KEY", secret=True)
    request_retries: int = setting(2, "retries of a request that failed to connect or got 502/503/504, before "
                                   "anything streamed", flag="request_retries", ge=0)
    read_timeout: float = setting(600.0, "seconds the upstream may stay silent mid-stream", flag="read_timeout", gt=0)


class Health(Section):
    health_interval: float = setting(2.0, "seconds between probes of the upstream", flag="health_interval", gt=0)
    health_url: str = setting("", "what to probe: default the server's /health (vLLM, SGLang, llama.cpp, "
                              "trtllm-serve and transformers serve all have one), or <base-url>/models for "
                              "--upstream-kind openai", flag="health_url")


class Engine(Section):
    served_model_id: str = setting("", "the model id this worker advertises to routers (default: --model)",
                                   flag="served_model_id")
    tokenizer: str = setting("", "the model's Hugging Face tokenizer (a local directory, or a .gguf file): chats are "
                             "rendered with its template and sent to /completions, so continuations are exact; token "
                             "ids are its ids", flag="tokenizer")
    chat_only: bool = setting(False, "the upstream has no /completions (e.g. a hosted chat model): text prompts are "
                              "refused", flag="chat_only")
    max_concurrency: int = setting(64, "upstream requests in flight (one per sample); beyond, tasks wait "
                                   "(--max-queued) or get RESOURCE_EXHAUSTED", flag="max_concurrency", ge=1)
    max_queued: int = setting(0, "tasks that may wait for upstream slots (a task waits for all n of its slots at "
                              "once); beyond, RESOURCE_EXHAUSTED (0: none wait, a task that does not fit is refused "
                              "at once)", flag="max_queued", ge=0)
    scheduling: Literal["fcfs", "run_las"] = setting(
        "fcfs", "the order waiting tasks start in: fcfs (arrival) or run_las (by run: priority, then the run that "
        "had attained the least service when the task was sent, with a 10 s anti-starvation bound)",
        flag="scheduling")
    max_context_tokens: int = setting(0, "the model's context, advertised (0: unknown)", flag="max_context_tokens",
                                      ge=0)
    max_n: int = setting(64, "largest n one generate task may ask for", flag="max_n", ge=1)


class Scoring(Section):
    no_verifier: bool = setting(False, "do not offer SCORE_VERIFIER (yes/no from the upstream's top logprobs)",
                                flag="no_verifier")
    max_candidates: int = setting(64, "largest number of candidates per score task", flag="max_candidates", ge=1)
    reward_api: Literal["", "classify"] = setting(
        "", "the upstream serves an outcome reward model instead of generating: 'classify' is vLLM's classification "
        "API (POST /classify; SGLang's /v1/classify); the worker then offers SCORE_OUTCOME only", flag="reward_api")
    reward_url: str = setting("", "where that API is (default: the server's /classify)", flag="reward_url")


class WorkerOpenaiSettings(Section):
    server: WorkerServer = WorkerServer()
    tls: ServerTLS = ServerTLS()
    upstream: Upstream = Upstream()
    health: Health = Health()
    engine: Engine = Engine()
    scoring: Scoring = Scoring()
    telemetry: Telemetry = Telemetry()
