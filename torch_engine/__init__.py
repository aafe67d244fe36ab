"""Trellis' PyTorch engine, a library two worker processes share (worker_cpu; worker_gpu --engine torch).

Continuous batching over a paged KV cache (`engine.py`: the loop; `sequence.py`, `scheduler.py`,
`block_manager.py`, `model_runner.py`, `sampler.py`), our own decoder over Hugging Face weights
(`model/`), model loading (`model_loader.py`), reward scoring (`scoring.py`), incremental
detokenization and stop strings. It implements worker_runtime's engine interface and imports
neither grpc nor the router.
"""
