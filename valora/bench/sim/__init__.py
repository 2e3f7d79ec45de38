"""`valora bench simulate`: N GPUs behind a router, each charged by one GPU's measured step costs (docs/bench.md)."""
