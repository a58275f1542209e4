"""One training loop for pretraining, SFT and preference stages."""
