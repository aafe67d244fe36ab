"""The OpenAI-compatible HTTP gateway: python -m gateway --router HOST:PORT --port 8080."""
