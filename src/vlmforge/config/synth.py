"""Synthetic world section (owned by vlmforge.synth).

Every output has its own random stream derived from ``seed``, so changing one count does not
change the other outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmforge.config.ranges import ranged


@dataclass
class FaultConfig:
    """Faults injected into the caption shards (fractions of ``num_captions``, each sample gets
    at most one); every injected fault is recorded in ``captions/faults.jsonl``.
    Defaults give a realistically dirty crawl (~20% faulty) for curation to clean; set all to 0
    (or ``vlmforge synth --clean``) for a clean world."""

    mismatch_frac: float = ranged(0.08, ge=0, le=1)  # caption of another, different scene
    exact_duplicate_frac: float = ranged(0.03, ge=0, le=1)  # same image bytes + caption under a new key
    near_duplicate_frac: float = ranged(0.03, ge=0, le=1)  # same picture downscaled, upscaled back and re-encoded
    truncated_jpeg_frac: float = ranged(0.01, ge=0, le=1)  # JPEG cut short
    non_image_frac: float = ranged(0.01, ge=0, le=1)  # HTML error page stored as .jpg
    empty_caption_frac: float = ranged(0.01, ge=0, le=1)  # empty .txt
    grayscale_frac: float = ranged(0.01, ge=0, le=1)  # mode L JPEG
    cmyk_frac: float = ranged(0.01, ge=0, le=1)  # CMYK JPEG
    rgba_frac: float = ranged(0.01, ge=0, le=1)  # RGBA PNG bytes stored as .jpg


@dataclass
class SynthConfig:
    seed: int = 0
    image_size: int = ranged(64, ge=1)
    jpeg_quality: int = ranged(90, ge=0, le=100)
    supersample: int = ranged(4, ge=1)  # draw at this multiple of image_size, then downsample (anti-aliasing)
    # The world: a subset of the built-in vocabulary (see vlmforge.synth.world).
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "star"])
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"])
    min_objects: int = ranged(1, ge=1, le=9)
    max_objects: int = ranged(4, ge=1, le=9)  # objects sit in distinct cells of a 3x3 grid, so at most 9
    repeat_prob: float = ranged(0.3, ge=0, le=1)  # chance a new object copies an earlier one's shape or colour (counting practice)
    # How many of each output.
    num_captions: int = ranged(2000, ge=0)
    # Relative weight of each caption style (synth.language.CAPTION_STYLES: short, positional,
    # detailed, dense); empty = the web-like mix of short, positional and detailed captions.
    caption_mix: dict[str, float] = ranged(factory=dict, ge=0)
    samples_per_shard: int = ranged(500, ge=1)
    num_sft: int = ranged(2000, ge=0)  # LLaVA conversations
    sft_multi_turn_frac: float = ranged(0.5, ge=0, le=1)
    sft_max_turns: int = ranged(4, ge=1)
    # Relative frequency of each turn kind in the SFT conversations (see synth.instructions);
    # empty = the built-in mix. Kinds: color shape count position existence size describe mcq math
    # (math: a reasoning problem answered with its worked steps; 0 in the built-in mix).
    sft_turn_weights: dict[str, float] = ranged(factory=dict, ge=0)
    # Share of question turns answered in a word (LLaVA-1.5's short-answer prompt) vs a sentence.
    sft_short_answer_frac: float = ranged(0.5, ge=0, le=1)
    # Share of SFT conversations without an image: the scene is described in words and the same
    # questions (multiple choice included) are answered from the text, as LLaVA-665k mixes in
    # text-only conversations. 0 keeps every conversation (and the random stream) as before.
    sft_text_only_frac: float = ranged(0.0, ge=0, le=1)
    # Share of the num_sft conversations that show two images ("image": [first, second], two <image>
    # lines) and ask what only both answer (synth.multi_image: which image has more circles, ...).
    # They come from their own stream, after the one-image ones: 0 keeps sft/ byte for byte.
    sft_multi_image_frac: float = ranged(0.0, ge=0, le=1)
    num_mcq: int = ranged(200, ge=0)
    num_vqa: int = ranged(200, ge=0)
    num_pope_images: int = ranged(100, ge=0)  # each gives pope_per_image yes + pope_per_image no questions
    pope_per_image: int = ranged(2, ge=0)
    # The reasoning task (synth.reasoning: count things, then add, subtract or multiply):
    # eval/math.jsonl (the built-in eval task synth-math) and eval/math_steps.jsonl (solutions
    # with a known first wrong step, '+'/'-' labels per step, for process reward models), on
    # held-out images. 0 by default: the task is opt-in (the demo world turns it on).
    num_math: int = ranged(0, ge=0)
    num_math_steps: int = ranged(0, ge=0)
    # Two-image questions on held-out image pairs: eval/multi.jsonl (the built-in eval task
    # synth-multi, multiple choice with "images": [first, second]). 0 by default (opt-in).
    num_multi: int = ranged(0, ge=0)
    num_preference: int = ranged(500, ge=0)
    # Training-split questions in the eval rows' formats (questions/{mcq,vqa,pope}.jsonl) and long
    # answers for dropout next-token prediction (questions/long_answers.jsonl), on fresh training
    # images: what `vlmforge preference build` asks (never the benchmarks).
    num_train_mcq: int = ranged(200, ge=0)
    num_train_vqa: int = ranged(200, ge=0)
    num_train_pope_images: int = ranged(50, ge=0)  # pope_per_image yes + as many no questions each
    num_long_answers: int = ranged(100, ge=0)
    num_train_math: int = ranged(0, ge=0)  # questions/math.jsonl: reasoning problems (what prm-data asks)
    num_text: int = ranged(3000, ge=0)  # lines of the text corpus
    # Labelled object images (vision/objects.jsonl: shape, colour, size and grid cell of every
    # object), a detection-style set for pretraining a vision tower (`vlmforge vision-pretrain`).
    num_vision: int = ranged(2000, ge=0)
    faults: FaultConfig = field(default_factory=FaultConfig)
