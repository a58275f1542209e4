"""Pretraining data: caption shards packed into fixed-length sequences, written once, loaded resumably.

plan (``vlmforge pack``: validate, tokenize, mix in text_corpus chunks, plan packs) -> packed_shards
(the on-disk format) -> loader (PackedDataset, PackedLoader, build_pretrain_loader).
command: the CLI entry.
"""
