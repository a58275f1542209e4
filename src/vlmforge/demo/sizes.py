"""How much data and training each `vlmforge demo --size` uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DemoSize:
    captions: int  # caption pairs in the raw (faulty) crawl
    sft: int  # LLaVA conversations
    mcq: int  # held-out multiple-choice questions
    vqa: int  # held-out open questions
    pope_images: int  # held-out POPE images (4 questions each)
    text_lines: int  # text corpus (tokenizer training)
    pretrain_epochs: float
    sft_epochs: float
    filter_epochs: int  # curation filter network
    vision_images: int  # labelled object images (vision tower pretraining)
    vision_epochs: int
    eval_limit: Optional[int] = None  # questions per benchmark (None: all)


SIZES: dict[str, DemoSize] = {
    # seconds per stage: for tests and CI; proves the plumbing, not the learning
    "tiny": DemoSize(captions=160, sft=96, mcq=16, vqa=16, pope_images=4, text_lines=300,
                     pretrain_epochs=1, sft_epochs=1, filter_epochs=1, vision_images=64, vision_epochs=1, eval_limit=16),
    "small": DemoSize(captions=800, sft=800, mcq=100, vqa=100, pope_images=25, text_lines=1500,
                      pretrain_epochs=4, sft_epochs=2, filter_epochs=4,
                      vision_images=1000, vision_epochs=20),
    "default": DemoSize(captions=2000, sft=8000, mcq=100, vqa=200, pope_images=50, text_lines=3000,
                        pretrain_epochs=8, sft_epochs=2.25, filter_epochs=8,
                        vision_images=2000, vision_epochs=25),
    "large": DemoSize(captions=8000, sft=16000, mcq=400, vqa=400, pope_images=100, text_lines=6000,
                      pretrain_epochs=6, sft_epochs=2, filter_epochs=10,
                      vision_images=4000, vision_epochs=25),
}
