"""GPU worker on TensorRT-LLM: serves the same worker contract as worker_cpu (trellis_rpc.worker_service).
Not built yet; see the GPU worker issue."""
