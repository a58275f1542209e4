import os

# Shared fixtures (tiny_tokenizer_dir, ...) for every test file.
pytest_plugins = ["fixtures_tokenizer"]

# No model hub here or in CI: everything must load from local folders.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
