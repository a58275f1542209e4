"""Synthetic world section (owned by vlmforge.synth).

Every output has its own random stream derived from ``seed``, so changing one count does not
change the other outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FaultConfig:
    """Faults injected into the caption shards (fractions of ``num_captions``, each sample gets
    at most one); every injected fault is recorded in ``captions/faults.jsonl``.
    Defaults give a realistically dirty crawl (~20% faulty) for curation to clean; set all to 0
    (or ``vlmforge synth --clean``) for a clean world."""

    mismatch_frac: float = 0.08  # caption of another, different scene
    exact_duplicate_frac: float = 0.03  # same image bytes + caption under a new key
    near_duplicate_frac: float = 0.03  # same picture downscaled, upscaled back and re-encoded
    truncated_jpeg_frac: float = 0.01  # JPEG cut short
    non_image_frac: float = 0.01  # HTML error page stored as .jpg
    empty_caption_frac: float = 0.01  # empty .txt
    grayscale_frac: float = 0.01  # mode L JPEG
    cmyk_frac: float = 0.01  # CMYK JPEG
    rgba_frac: float = 0.01  # RGBA PNG bytes stored as .jpg


@dataclass
class SynthConfig:
    seed: int = 0
    image_size: int = 64
    jpeg_quality: int = 90
    supersample: int = 4  # draw at this multiple of image_size, then downsample (anti-aliasing)
    # The world: a subset of the built-in vocabulary (see vlmforge.synth.world).
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "star"])
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"])
    min_objects: int = 1
    max_objects: int = 4  # objects sit in distinct cells of a 3x3 grid, so at most 9
    repeat_prob: float = 0.3  # chance a new object copies an earlier one's shape or colour (counting practice)
    # How many of each output.
    num_captions: int = 2000
    # Relative weight of each caption style (synth.language.CAPTION_STYLES: short, positional,
    # detailed, dense); empty = the web-like mix of short, positional and detailed captions.
    caption_mix: dict[str, float] = field(default_factory=dict)
    samples_per_shard: int = 500
    num_sft: int = 2000  # LLaVA conversations
    sft_multi_turn_frac: float = 0.5
    sft_max_turns: int = 4
    # Relative frequency of each turn kind in the SFT conversations (see synth.instructions);
    # empty = the built-in mix. Kinds: color shape count position existence size describe mcq.
    sft_turn_weights: dict[str, float] = field(default_factory=dict)
    # Share of question turns answered in a word (LLaVA-1.5's short-answer prompt) vs a sentence.
    sft_short_answer_frac: float = 0.5
    # Share of SFT conversations without an image: the scene is described in words and the same
    # questions (multiple choice included) are answered from the text, as LLaVA-665k mixes in
    # text-only conversations. 0 keeps every conversation (and the random stream) as before.
    sft_text_only_frac: float = 0.0
    num_mcq: int = 200
    num_vqa: int = 200
    num_pope_images: int = 100  # each gives pope_per_image yes + pope_per_image no questions
    pope_per_image: int = 2
    num_preference: int = 500
    num_text: int = 3000  # lines of the text corpus
    # Labelled object images (vision/objects.jsonl: shape, colour, size and grid cell of every
    # object), a detection-style set for pretraining a vision tower (`vlmforge vision-pretrain`).
    num_vision: int = 2000
    faults: FaultConfig = field(default_factory=FaultConfig)
