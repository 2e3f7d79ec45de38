"""Messages between front ends and the engine core: pickle protocol 5 over ZeroMQ multipart frames.

A message is a tuple (kind, ...). Tensors (image pixels, M-RoPE positions) leave the pickle stream as numpy
buffers out of band, one ZeroMQ frame each, sent and received without a copy; everything else (requests,
sampling params, outputs, stats) is ordinary pickled data. Frames under 1 KiB stay in band. Received tensors
are read-only views of their frame (nothing in the engine writes its inputs in place).

Kinds, front end -> core: ("hello",), ("add", call_id, [EngineCoreRequest]), ("abort", [request_id]),
("call", call_id, method, args); core -> front end: ("info", CoreInfo), ("ack", call_id, error or None),
("result", call_id, value, error or None), ("outputs", [EngineCoreOutput]), ("adapter", AdapterEvent),
("dead", message).
"""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Any

import numpy as np
import torch

_IN_BAND = 1024


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any):
        if isinstance(obj, torch.Tensor):
            flat = obj.detach().cpu().contiguous().reshape(-1)
            return _tensor, (flat.view(torch.uint8).numpy(), obj.dtype, tuple(obj.shape))
        return NotImplemented


def _tensor(data: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    with warnings.catch_warnings():  # a received buffer is read-only; torch warns about that on every view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data).view(dtype).reshape(shape)


def encode(msg: tuple) -> list:
    """`msg` as frames: the pickle stream first, then its large buffers."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < _IN_BAND:
            return True
        buffers.append(buf)
        return False

    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=out_of_band).dump(msg)
    return [stream.getbuffer(), *buffers]


def decode(frames: list) -> tuple:
    """The message from frames as `recv_multipart(copy=False)` gives them (zmq.Frame) or as bytes."""
    first, rest = frames[0], frames[1:]
    return pickle.loads(getattr(first, "buffer", first), buffers=[getattr(f, "buffer", f) for f in rest])
