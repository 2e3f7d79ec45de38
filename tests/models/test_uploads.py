"""Host-to-device uploads of a step's inputs (models/layers/uploads.py): the rows land where they belong, in the
device's dtype, padding rows zero; on a GPU the copies never synchronise the host and a pinned buffer is never
handed out again while its copy is in flight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from valora.models.layers.uploads import upload, upload_pixels, upload_rows
from valora.multimodal.pixels import PixelNormalizer

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


def _hf_values(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """HF's arithmetic on [n, 3, ...] uint8 pixels: float64 rescale rounded to float32, then (x - mean) / std."""
    x = (pixels.numpy().astype(np.float64) * (1 / 255)).astype(np.float32)
    shape = (1, 3) + (1,) * (pixels.dim() - 2)
    return torch.from_numpy((x - np.array(mean, np.float32).reshape(shape)) / np.array(std, np.float32).reshape(shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixels_read_through_each_items_table_on_the_device(device, dtype):
    """Two items with different tables ([n, 3, H, W] images, as LLaVA's and InternVL's; Qwen's [n, 3 * k] patches
    view the same), padding rows zero, the values HF's processor computes, bit for bit before the dtype cast."""
    g = torch.Generator().manual_seed(0)
    stats = [([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), ([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])]
    tables = [PixelNormalizer.build(True, 1 / 255, True, m, s).table for m, s in stats]
    parts = [torch.randint(0, 256, (n, 3, 4, 5), dtype=torch.uint8, generator=g) for n in (2, 1)]
    out = upload_pixels(parts, tables, 6, dtype, device)
    expected = torch.cat([_hf_values(p, *st) for p, st in zip(parts, stats)]).to(dtype)
    assert out.shape == (6, 3, 4, 5) and out.dtype == dtype and out.device.type == device
    assert torch.equal(out[:3].cpu(), expected) and not out[3:].any()
    flat = upload_pixels([p.flatten(1) for p in parts], tables, 3, dtype, device)
    assert torch.equal(flat.cpu(), expected.flatten(1))


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
        table = PixelNormalizer.build(True, 1 / 255, False, 0, 1).table
        pixels = upload_pixels([torch.full((2, 3, 8), 255, dtype=torch.uint8)], [table], 4, torch.bfloat16, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for i in range(32):
        assert torch.equal(outs[2 * i][:1000].cpu(), refs[i].to(torch.bfloat16)) and not outs[2 * i][1000:].any()
        assert torch.equal(outs[2 * i + 1].cpu(), torch.full((100,), i, dtype=torch.int32))
    assert torch.equal(pixels.cpu(), torch.tensor([1.0, 1.0, 0.0, 0.0]).view(4, 1, 1).expand(4, 3, 8).bfloat16())
