"""SFT data: LLaVA records indexed once on disk, then packed or length-grouped into batches.

records (LLaVA record -> chat messages) -> meta (InternVL meta files: a mixture of named sources)
-> scan (byte spans of records, no parsing) -> lengths (exact or estimated token counts) -> parallel
(parsing workers) -> build (``vlmforge sft-index``) -> index (the memory-mapped reader) -> samples
(SFTDataset; augment: random JPEG quality) -> loader (SFTLoader, build_sft_loader).
"""
