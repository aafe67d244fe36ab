"""CPU worker: Hugging Face causal LMs on PyTorch, serving the Trellis worker contract."""
