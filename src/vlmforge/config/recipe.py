"""The whole recipe: one section per stage. Every field has a default unless marked MISSING."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmforge.config.curate import CurateConfig
from vlmforge.config.data import DataConfig, PackConfig
from vlmforge.config.eval import EvalConfig
from vlmforge.config.model import ModelConfig
from vlmforge.config.mpo import MPOConfig
from vlmforge.config.preference import PreferenceDataConfig
from vlmforge.config.sft import SFTDataConfig
from vlmforge.config.synth import SynthConfig
from vlmforge.config.tokenizer import TokenizerConfig
from vlmforge.config.train import TrainConfig
from vlmforge.config.vision import VisionPretrainConfig


@dataclass
class Recipe:
    name: str = "unnamed"
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    preference: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mpo: MPOConfig = field(default_factory=MPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    vision_pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)


def run_seed(cfg: Recipe) -> int:
    """The seed of a training run and of its data order: ``train.seed``, or the recipe's top-level ``seed``."""
    return int(cfg.train.seed if cfg.train.seed is not None else cfg.seed)
