"""A tiny randomly initialised Llama with a byte-level BPE tokenizer trained here, saved with
save_pretrained: a real Hugging Face model directory that loads in a second and needs no hub."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}"
    "{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 7 = 19. What is 3 + 4? The answer is 7.",
    "Question: how many apples? Answer: \\boxed{42}. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Unicode: héllo wörld, naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский текст.",
    "Step 1: add the numbers. Step 2: check the result. Therefore the final answer is 19.",
] * 20


def build_tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE (vocabulary 400) trained on CORPUS, with the ChatML-like template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(target: Path, max_position_embeddings: int = 256, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_tiny_reward_model(target: Path, head: str = "sequence", num_labels: int = 1, arch: str = "llama",
                            seed: int = 0, chat_template: str | None = CHAT_TEMPLATE,
                            pad_in_config: bool = True, max_position_embeddings: int = 256) -> Path:
    """A tiny randomly initialised reward model: head "sequence" (*ForSequenceClassification, an
    outcome reward model) or "token" (*ForTokenClassification, a process reward model), on a Llama
    or Qwen2 backbone, with the same tokenizer as build_tiny_llama."""
    import torch
    import transformers

    tokenizer = build_tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    config_cls = getattr(transformers, f"{prefix}Config")
    task = "SequenceClassification" if head == "sequence" else "TokenClassification"
    model_cls = getattr(transformers, f"{prefix}For{task}")
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad_in_config else None, num_labels=num_labels,
    )
    model = model_cls(config)
    with torch.no_grad():  # a visible spread of scores: the default head init is tiny
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] == num_labels:
                p.normal_(0.0, 0.1)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


REMOTE_CODE = """
from transformers import AutoModel, LlamaConfig, LlamaForSequenceClassification, LlamaModel


class CustomRewardConfig(LlamaConfig):
    model_type = "custom_reward"


class CustomBackbone(LlamaModel):
    config_class = CustomRewardConfig


class CustomRewardModel(LlamaForSequenceClassification):
    config_class = CustomRewardConfig


AutoModel.register(CustomRewardConfig, CustomBackbone)   # what the classification head builds its body from
"""


def build_remote_code_reward_model(target: Path) -> Path:
    """build_tiny_reward_model's outcome model, whose classes are Python of its own (config.json auto_map), as
    models that need trust_remote_code ship them."""
    import json

    build_tiny_reward_model(target)
    (target / "modeling_custom.py").write_text(REMOTE_CODE)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="custom_reward", architectures=["CustomRewardModel"],
                  auto_map={"AutoConfig": "modeling_custom.CustomRewardConfig",
                            "AutoModelForSequenceClassification": "modeling_custom.CustomRewardModel"})
    (target / "config.json").write_text(json.dumps(config))
    return target
