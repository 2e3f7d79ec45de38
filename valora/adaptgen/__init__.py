"""Accuracy-aware adapter generation: fuse vision tasks into as few adapters as their accuracy floors allow."""
