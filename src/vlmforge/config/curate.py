"""Curation section (owned by vlmforge.curate).

Every ``vlmforge curate`` subcommand reads its settings from here; command-line flags
override the matching field (they are shortcuts for ``--set curate.<...>=...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from vlmforge.config.ranges import ranged
from vlmforge.config.train import Device

Scorer = Literal["clip", "dfn", "mlm"]
# The four judging instructions of MLM-Filter (vlmforge.curate.scorers.mlm.METRIC_PROMPTS).
MLMMetric = Literal["image_text_matching", "object_detail_fulfillment", "caption_text_quality",
                    "semantic_understanding"]
ExactKey = Literal["uid", "image", "caption", "pair"]


@dataclass
class ScoreConfig:
    scorer: Scorer = "clip"
    # clip/dfn: transformers CLIPModel / SiglipModel folder or hub id; mlm: a vlmforge checkpoint folder.
    model: Optional[str] = None
    batch_size: int = ranged(64, ge=1)
    num_workers: int = ranged(0, ge=0)  # DataLoader workers that read + decode + preprocess shards
    device: Device = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # model weights during scoring
    trust_remote_code: bool = False
    # clip/dfn: also store the L2-normalised image embedding per sample (column image_embedding,
    # float16 values) for embedding near-duplicate search in `curate dedup`.
    save_embeddings: bool = False
    # clip/dfn: decode JPEGs at the smallest DCT scale (1/2..1/8) that still covers the model's input
    # (vlmforge.curate.io.decode_scaled): less reader CPU, slightly other pixels (scores move a little).
    draft_decode: bool = False
    # mlm judge
    mlm_metrics: List[MLMMetric] = field(
        default_factory=lambda: [
            "image_text_matching",
            "object_detail_fulfillment",
            "caption_text_quality",
            "semantic_understanding",
        ]
    )
    mlm_max_new_tokens: int = ranged(8, ge=1)
    # Which value becomes the ``score`` column of an mlm sidecar: ev (expected value) or parsed (greedy text).
    mlm_score: Literal["ev", "parsed"] = "ev"
    # How the judge is asked and read. vlmforge: our own instructions in the checkpoint's chat template,
    # the first integer 0..100 in up to mlm_max_new_tokens greedy tokens. mlm_filter: the published
    # MLM-Filter protocol (its criteria and prompt template verbatim, LLaVA's qwen_instruct conversation,
    # the first 2 greedy tokens read as the score), for judges trained with it (e.g. an imported
    # weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o). Both also give the expected-value score.
    mlm_protocol: Literal["vlmforge", "mlm_filter"] = "vlmforge"


@dataclass
class TrainFilterConfig:
    # clip: softmax contrastive, robust from scratch; siglip: sigmoid loss (SiglipModel)
    arch: Literal["clip", "siglip"] = "clip"
    init: Optional[str] = None  # start from a CLIP/SigLIP checkpoint folder instead of random weights
    tokenizer: Optional[str] = None  # tokenizer folder for a from-scratch filter (default: train one on the captions)
    tokenizer_vocab_size: int = ranged(1024, ge=1)
    image_size: int = ranged(64, ge=1)
    patch_size: int = ranged(8, ge=1)
    hidden_size: int = ranged(64, ge=1)
    num_layers: int = ranged(2, ge=1)
    num_heads: int = ranged(4, ge=1)
    embed_dim: int = ranged(64, ge=1)  # clip projection size
    max_text_len: int = ranged(64, ge=1)  # room for the synthetic world's longest captions
    epochs: int = ranged(6, ge=1)
    batch_size: int = ranged(32, ge=1)
    lr: float = ranged(1.0e-3, gt=0)
    weight_decay: float = ranged(0.05, ge=0)
    holdout_frac: float = ranged(0.1, ge=0, lt=1)  # trusted pairs kept aside to calibrate the keep threshold
    # Threshold written to calibration.json: keep this fraction of held-out trusted pairs.
    calibrate_keep: float = ranged(0.95, ge=0, le=1)
    seed: int = 0


@dataclass
class NearDupConfig:
    method: Literal["phash", "embedding", "none"] = "phash"
    # phash: max Hamming distance (of 64 bits) to call two images near-duplicates.
    phash_max_distance: int = ranged(4, ge=0, le=64)
    # embedding: min cosine similarity of image embeddings to call near-duplicates; the embeddings come
    # from a score folder written with curate.score.save_embeddings=true (`curate dedup --embeddings DIR`).
    embedding_min_cosine: float = ranged(0.95, ge=-1, le=1)
    embeddings: Optional[str] = None
    embedding_block: int = ranged(4096, ge=1)  # rows per block of the blocked similarity search


@dataclass
class DedupConfig:
    # Exact keys; a later sample equal on any of them to an earlier one is dropped.
    # uid, image (sha256 of the bytes), caption (normalised text), pair (image sha256 + normalised caption)
    exact: List[ExactKey] = field(default_factory=lambda: ["uid", "image"])
    near: NearDupConfig = field(default_factory=NearDupConfig)


@dataclass
class CurateConfig:
    samples_per_shard: int = ranged(1000, ge=1)  # output shards of filter / dedup / mix
    num_workers: int = ranged(0, ge=0)  # reader workers for filter / dedup passes
    # filter criteria (see `vlmforge curate filter --help`), e.g. "clip.score>=0.28", "dfn.score:top=0.15",
    # "uids:/path/subset.npy"
    criteria: List[str] = field(default_factory=list)
    combine: Literal["and", "or"] = "and"  # how several criteria combine
    # When set, every output sample is checked to decode; undecodable ones are dropped as corrupt.
    check_images: bool = True
    seed: int = 0
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train_filter: TrainFilterConfig = field(default_factory=TrainFilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
