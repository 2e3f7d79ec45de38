"""Host-to-device uploads of a step's inputs (models/layers/uploads.py): the rows land where they belong, in the
device's dtype, padding rows zero; on a GPU the copies never synchronise the host and a pinned buffer is never
handed out again while its copy is in flight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from valora.models.layers.uploads import upload, upload_rows

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", *(["cuda"] if CUDA else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_rows_stacked_converted_and_padded(device):
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, 4, generator=g) for n in (2, 5, 1)]
    out = upload_rows(parts, 11, torch.bfloat16, device)
    assert out.shape == (11, 3, 4) and out.dtype == torch.bfloat16 and out.device.type == device
    torch.testing.assert_close(out[:8].cpu(), torch.cat(parts).to(torch.bfloat16), atol=0, rtol=0)
    assert not out[8:].any()


def test_rows_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        upload_rows([torch.zeros(3, 2)], 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="no rows"):
        upload_rows([], 2, torch.float32, "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_arrays_and_tensors_arrive_unchanged(device):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]  # not contiguous
    out = upload(a, device)
    assert out.dtype == torch.int32 and torch.equal(out.cpu(), torch.from_numpy(a.copy()))
    t = torch.arange(5, dtype=torch.int64)
    assert torch.equal(upload(t, device).cpu(), t)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_uploads_never_synchronise_and_never_overwrite_a_copy_in_flight():
    """Many uploads queued behind a long kernel, each from a host buffer that is freed at once: every device tensor
    holds its own data (the pinned cache did not reuse a buffer under a pending copy), and none synchronised."""
    busy = torch.randn(4096, 4096, device="cuda")
    outs, refs = [], []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            busy = busy @ busy  # keeps the stream busy while the copies queue
        for i in range(32):
            ref = torch.full((1000, 7), float(i))
            outs.append(upload_rows([ref[:600], ref[600:]], 1024, torch.bfloat16, "cuda"))
            refs.append(ref)
            outs.append(upload(np.full(100, i, dtype=np.int32), "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for i in range(32):
        assert torch.equal(outs[2 * i][:1000].cpu(), refs[i].to(torch.bfloat16)) and not outs[2 * i][1000:].any()
        assert torch.equal(outs[2 * i + 1].cpu(), torch.full((100,), i, dtype=torch.int32))
