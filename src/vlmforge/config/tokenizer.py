"""Tokenizer section (owned by vlmforge.text.tokenization)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vlmforge.config.ranges import ranged


@dataclass
class TokenizerConfig:
    # Local folder or hub id loaded with AutoTokenizer; None = train/use the built-in world's tokenizer.
    path: Optional[str] = None
    trust_remote_code: bool = False
    # `vlmforge tokenizer train` settings
    vocab_size: int = ranged(1024, ge=1)
    min_frequency: int = ranged(2, ge=0)
