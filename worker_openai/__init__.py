"""A Trellis worker over any OpenAI-compatible server (python -m worker_openai)."""
