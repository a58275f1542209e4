"""Special tokens every vlmforge tokenizer carries, and the chat roles' markers (Qwen2.5's shape)."""

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS = "<|endoftext|>"
# Order fixes the ids of a trained tokenizer: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, <image>=3.
SPECIAL_TOKENS = [EOS, IM_START, IM_END, IMAGE_TOKEN]

# A process reward model's two replies (VisualPRM): each assistant turn of its conversation is one
# of these, the verdict on the step in the user turn before it.
PRM_PLUS = "+"
PRM_MINUS = "-"
