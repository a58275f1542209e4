"""Data: tokenizer and chat template, sequence packing, packed/SFT datasets and loaders."""
