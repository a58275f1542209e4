"""Process reward data (`vlmforge prm-data`): a policy's sampled solutions cut into steps, each step
labelled by Monte Carlo rollouts from the prefix that ends with it (VisualPRM's recipe).

``montecarlo``: the labelling as a pure function over a policy callable; ``policy``: that callable
over a vlmforge model; ``build``: parts, ranks, resuming and the output files.
"""
