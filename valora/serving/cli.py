"""`valora serve MODEL [flags]`: one server (valora/server), or with `--data-parallel-size N` N of them as replicas
behind Ray Serve (serving/ray.py), with the same flags."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from valora.errors import UserError
from valora.server import cli as server_cli

logger = logging.getLogger("valora.serving")

# Flags of one server's own HTTP listener, which Ray Serve's proxy replaces (its keep-alive timeout is passed on)
_ONE_SERVER_ONLY = ("api_server_count", "limit_concurrency", "timeout_request_header", "timeout_request_body")


def add_arguments(p: argparse.ArgumentParser) -> None:
    server_cli.add_arguments(p)
    g = p.add_argument_group("replicas")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                   help="N engine replicas behind Ray Serve on --host:--port, requests routed by adapter: to a "
                        "replica holding it, else to one holding the fewest, which loads it (needs the ray extra; "
                        "$RAY_ADDRESS joins a running cluster; default: 1, no Ray)")


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="valora serve")
    add_arguments(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.data_parallel_size < 1:
        raise UserError("--data-parallel-size must be at least 1")
    if args.data_parallel_size == 1:
        return server_cli.run(args)
    defaults = parse_serve_args([args.model])
    for name in _ONE_SERVER_ONLY:
        if getattr(args, name) != getattr(defaults, name):
            raise UserError(f"--{name.replace('_', '-')} applies to one server, not to replicas behind Ray Serve "
                            "(--data-parallel-size)")
    try:
        from valora.serving import ray as replicas
    except ImportError as e:
        raise UserError(f"--data-parallel-size needs Ray Serve ({e}): pip install 'valora[ray]'") from e
    from valora.server.launch import bind

    engine, config = server_cli.checked_configs(args)
    bind(args.host, args.port).close()  # a port in use is said now, not after Ray started
    replicas.start(engine, config, args.data_parallel_size, args.host, args.port, args.timeout_keep_alive)
    logger.info("serving %d replicas on http://%s:%d (Ctrl-C stops)", args.data_parallel_size, args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        replicas.stop()
    return 0
