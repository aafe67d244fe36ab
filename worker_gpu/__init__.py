"""GPU worker: serves the worker contract of worker_runtime.service on TensorRT-LLM's LLM API
(`trtllm_engine.py`, sampling mapped in `trtllm_sampling.py`, reward scoring from context logits in
`trtllm_scoring.py`) or on Trellis' own PyTorch engine (torch_engine) on CUDA (`torch_backend.py`)."""
