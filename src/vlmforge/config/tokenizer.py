"""Tokenizer section (owned by vlmforge.text.tokenization)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TokenizerConfig:
    # Local folder or hub id loaded with AutoTokenizer; None = train/use the built-in world's tokenizer.
    path: Optional[str] = None
    trust_remote_code: bool = False
    # `vlmforge tokenizer train` settings
    vocab_size: int = 1024
    min_frequency: int = 2
