"""Take the weights of a loaded Hugging Face causal LM into DecoderWeights (Llama, Mistral, Qwen2, GPT-2).

Linear weights are used as they are (shared, no copy) except where fusing saves a matmul per layer:
q/k/v become one matrix, gate/up another. GPT-2's Conv1D weights are stored transposed, so they are
transposed once here.
"""

from __future__ import annotations

import torch

from torch_engine.model.decoder import DecoderSpec, DecoderWeights, LayerWeights

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_LIKE, "gpt2")


class UnsupportedModel(ValueError):
    pass


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    if all(t is None for t in tensors):
        return None
    return torch.cat([t for t in tensors if t is not None], dim=0).contiguous()


def _bias(module) -> torch.Tensor | None:
    return module.bias.detach() if getattr(module, "bias", None) is not None else None


def _rope_tables(hf_model, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = hf_model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") not in ("default", "linear", "llama3"):
        # dynamic / yarn / longrope change inv_freq with the sequence length.
        raise UnsupportedModel(f"rope type {rotary.rope_type!r} is not supported by the paged engine")
    inv_freq = rotary.inv_freq.detach().float()
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return emb.cos() * scale, emb.sin() * scale


def _llama_like(hf_model, dtype: torch.dtype) -> DecoderWeights:
    cfg = hf_model.config
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise UnsupportedModel("sliding-window attention is not supported by the paged engine")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "gelu_pytorch_tanh", "gelu"):
        raise UnsupportedModel(f"activation {act!r} is not supported")
    spec = DecoderSpec(
        arch=cfg.model_type, num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab=cfg.vocab_size, max_positions=cfg.max_position_embeddings, norm="rms", eps=cfg.rms_norm_eps,
        act={"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}[act], gated_mlp=True, rope=True,
    )
    layers = []
    for layer in hf_model.model.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            norm1=layer.input_layernorm.weight.detach(), norm1_bias=None,
            qkv=_cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight).detach(),
            qkv_bias=_cat(_bias(a.q_proj), _bias(a.k_proj), _bias(a.v_proj)),
            out=a.o_proj.weight.detach(), out_bias=_bias(a.o_proj),
            norm2=layer.post_attention_layernorm.weight.detach(), norm2_bias=None,
            up=_cat(m.gate_proj.weight, m.up_proj.weight).detach(), up_bias=_cat(_bias(m.gate_proj), _bias(m.up_proj)),
            down=m.down_proj.weight.detach(), down_bias=_bias(m.down_proj),
        ))
    cos, sin = _rope_tables(hf_model, spec.max_positions)
    return DecoderWeights(
        spec=spec, embed=hf_model.model.embed_tokens.weight.detach(), pos_embed=None, layers=layers,
        final_norm=hf_model.model.norm.weight.detach(), final_norm_bias=None,
        lm_head=hf_model.lm_head.weight.detach(), lm_head_bias=_bias(hf_model.lm_head), rope_cos=cos, rope_sin=sin,
    )


def _gpt2(hf_model, dtype: torch.dtype) -> DecoderWeights:
    cfg = hf_model.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        raise UnsupportedModel("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                               "reorder_and_upcast_attn) are not supported")
    if not getattr(cfg, "scale_attn_weights", True):
        raise UnsupportedModel("GPT-2 without scale_attn_weights is not supported")
    act = cfg.activation_function
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise UnsupportedModel(f"activation {act!r} is not supported")
    heads = cfg.n_head
    spec = DecoderSpec(
        arch="gpt2", num_layers=cfg.n_layer, hidden=cfg.n_embd, num_heads=heads, num_kv_heads=heads,
        head_dim=cfg.n_embd // heads, vocab=cfg.vocab_size, max_positions=cfg.n_positions, norm="layer",
        eps=cfg.layer_norm_epsilon, act="gelu" if act == "gelu" else "gelu_tanh", gated_mlp=False, rope=False,
    )
    t = hf_model.transformer
    layers = []
    for block in t.h:
        layers.append(LayerWeights(
            norm1=block.ln_1.weight.detach(), norm1_bias=block.ln_1.bias.detach(),
            qkv=block.attn.c_attn.weight.detach().t().contiguous(), qkv_bias=block.attn.c_attn.bias.detach(),
            out=block.attn.c_proj.weight.detach().t().contiguous(), out_bias=block.attn.c_proj.bias.detach(),
            norm2=block.ln_2.weight.detach(), norm2_bias=block.ln_2.bias.detach(),
            up=block.mlp.c_fc.weight.detach().t().contiguous(), up_bias=block.mlp.c_fc.bias.detach(),
            down=block.mlp.c_proj.weight.detach().t().contiguous(), down_bias=block.mlp.c_proj.bias.detach(),
        ))
    return DecoderWeights(
        spec=spec, embed=t.wte.weight.detach(), pos_embed=t.wpe.weight.detach(), layers=layers,
        final_norm=t.ln_f.weight.detach(), final_norm_bias=t.ln_f.bias.detach(),
        lm_head=hf_model.lm_head.weight.detach(), lm_head_bias=_bias(hf_model.lm_head),
    )


def decoder_from_hf(hf_model, dtype: torch.dtype) -> DecoderWeights:
    """hf_model must already be in `dtype` (the loader casts it)."""
    model_type = hf_model.config.model_type
    if model_type in LLAMA_LIKE:
        return _llama_like(hf_model, dtype)
    if model_type == "gpt2":
        return _gpt2(hf_model, dtype)
    raise UnsupportedModel(f"model type {model_type!r} is not supported by the CPU engine "
                           f"(supported: {', '.join(SUPPORTED)})")
