"""Why the engine core refuses a request or stops, as exceptions that keep their type across the process
boundary (front ends map them to HTTP statuses)."""

from __future__ import annotations

from valora.multimodal.inputs import InputError


class AdapterNotLoadedError(InputError):
    """The request's adapter is not (or no longer) loaded in the engine core."""


class QueueFullError(RuntimeError):
    """More requests are in flight than the running batch and the waiting queue may hold; retry later."""


class EngineDeadError(RuntimeError):
    """The engine core stopped (an error, or its process died); nothing more can be served."""


def check_capacity(in_flight: int, count: int, cap: int) -> None:
    """Refuse `count` more sequences when `in_flight` are held of at most `cap`: `InputError` when they could
    never fit (the client's error: 400), `QueueFullError` when they do not fit now (retry: 503)."""
    if count > cap:
        raise InputError(f"the request needs {count} sequences (prompts x n) but the server holds at most {cap} "
                         "(--max-num-seqs plus --max-queued-requests)", "request_too_large", "n")
    if in_flight + count > cap:
        raise QueueFullError(f"{in_flight} requests in flight; the server takes at most {cap} (running batch "
                             "plus waiting queue)")
