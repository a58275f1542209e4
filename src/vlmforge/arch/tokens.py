"""Special tokens every vlmforge tokenizer carries, and the chat roles' markers (Qwen2.5's shape)."""

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS = "<|endoftext|>"
# Order fixes the ids of a trained tokenizer: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, <image>=3.
SPECIAL_TOKENS = [EOS, IM_START, IM_END, IMAGE_TOKEN]
