"""Serving beyond one engine: replicas behind Ray Serve, routed by adapter (ray.py), and the `valora serve` command
that starts either one server or the replicas (cli.py). docs/distributed.md#replicas-behind-ray-serve."""
