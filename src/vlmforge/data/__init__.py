"""Data: the two training data paths, sharing the bin packer (packer) and the batch contract (collate).

- pretrain: caption shards -> planned packs -> packed shards on disk -> PackedLoader (``vlmforge pack``).
- sft: LLaVA records -> memory-mapped index -> SFTLoader (``vlmforge sft-index``).
"""
