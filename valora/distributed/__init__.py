"""Tensor parallelism's process group and collectives (`state`); the parallel layers built on them live beside the
layers they shard (valora/models/layers/parallel.py), the worker processes with the engine (docs/distributed.md)."""
