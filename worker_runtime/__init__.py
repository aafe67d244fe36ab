"""The worker side of the contract, which every worker process runs over its engine.

`service.py` serves trellis.v1.Worker (task multiplexing on one stream, cancellation, kept-sequence
release, load reports); `engine_api.py` is the interface an engine and a scorer implement, in plain
dataclasses; `prompts.py` turns a prompt into token ids for engines with a Hugging Face-style
tokenizer; `telemetry.py` holds the worker's spans and metrics. It imports no torch: a worker that
forwards to another server runs it too.
"""
