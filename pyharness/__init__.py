"""pyharness: build, patch and evaluate llama.cpp variants."""

__version__ = "0.1.0"
