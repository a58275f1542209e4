"""`vlmforge demo`: the whole pipeline on the built-in synthetic world, with a report."""
