"""Mirrors tensorrt_llm/version.py. Not stored at the mirrored commit; GitHub Releases' newest 1.3 tag."""

__version__ = "1.3.0rc24"
