"""The vision-language model: vision tower + projector + causal LM, generation, export."""
