"""`vlmforge plan`: memory per GPU and wall time of a recipe before renting the GPUs."""
