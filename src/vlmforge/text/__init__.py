"""Text: tokenizers (train offline, load any transformers tokenizer) and chat encoding with a loss mask."""
