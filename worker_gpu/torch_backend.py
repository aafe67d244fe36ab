"""--engine torch: Trellis' own PyTorch engine (torch_engine's continuous batching over a paged KV cache,
prefix cache, kept sequences, reward scoring) with the model on a CUDA device, for GPUs where
TensorRT-LLM is not available. The engine runs wherever the model's weights are."""

from __future__ import annotations

import argparse

import structlog

log = structlog.get_logger(__name__)


def build_torch(args: argparse.Namespace):
    """(engine, scorer): a TorchEngine on args.device, and the verifier (or a reward model's scorer)."""
    import torch

    from torch_engine.engine import TorchEngine
    from torch_engine.model_loader import load_any
    from torch_engine.scoring import scorer_for

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda}); pass --device cpu to run on the CPU")
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    loaded = load_any(args.model, dtype, args.trust_remote_code)
    loaded.model.to(device)
    score_options = dict(max_candidates=64, max_batch_tokens=args.max_num_tokens, max_context=args.max_context_tokens)
    if loaded.kind != "causal":
        return None, scorer_for(loaded, **score_options)
    engine = TorchEngine(loaded, max_batch_size=args.max_batch_size, kv_cache_tokens=args.kv_cache_tokens,
                         max_num_tokens=args.max_num_tokens, max_context=args.max_context_tokens,
                         # the CPU engine's int8 and compiled paths are measured on CPUs only
                         quantize="none", compile="off")
    scorer = None
    if not args.no_verifier:
        try:
            scorer = scorer_for(loaded, **score_options)
        except ValueError as err:
            log.warning("no verifier", reason=str(err))
    return engine, scorer
