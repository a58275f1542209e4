"""Process reward models (VisualPRM): solutions cut into steps, the critic's conversation format,
and step scores P('+') read in one forward pass (``vlmforge prm-score``)."""
