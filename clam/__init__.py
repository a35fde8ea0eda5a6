"""Stage 2: train CLAM on the cached feature bags, evaluate it and explain its attention."""

__version__ = "0.1.0"
