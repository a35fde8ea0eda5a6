"""Stage 1: find the tiles of each slide, embed them with a backbone, write one HDF5 bag per slide."""

__version__ = "0.1.0"
