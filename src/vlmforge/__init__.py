"""vlmforge: build vision-language models on academic resources."""

__version__ = "0.1.0"
