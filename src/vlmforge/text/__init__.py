"""Text: ``tokenization`` (train a byte-level BPE offline, load any transformers tokenizer) and
``chat`` (the chat template and chat encoding with a loss mask)."""
