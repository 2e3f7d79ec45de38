"""Image preprocessing throughput (issue 17, acceptance 2): 448x448 JPEGs per second through decode + preprocess +
content hash, in one process, ours next to the Hugging Face image processor, per family.

    python -m benchmarks.preprocess            # every family, 1 thread and a pool of os.cpu_count() threads
    python -m benchmarks.preprocess --quick    # CPU check: fewer images, 1 and 2 threads

"ours" is what the engine runs for an image: `load_image` (PIL decode, RGB) and the family processor's
`image_run`: PIL resize to the model's pixels, one uint8 copy into the model's layout (since 2026-12-07 the table
gather that rescales and normalises them runs on the model's device, `upload_pixels`), and `content_hash` of the
resized pixels. "hf" is what it ran before: PIL decode, the checkpoint's HF image processor (the PIL backend;
also the torchvision one where torchvision is installed) and a blake2b hash of the float32 pixel tensors. Images are
real photos (the bench workload's pictures, panned crops) encoded as JPEG quality 90. Processor settings are the real
checkpoints': Qwen2-VL-7B's (min_pixels 3136, max_pixels 12845056), LLaVA-1.5's CLIP at 336 px, InternVL3's
GotOcr2 at 448 px with up to 12 tiles. A thread pool runs the images; torch runs one intra-op thread per call.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import write_result
from valora.config import MultiModalConfig
from valora.multimodal.inputs import load_image

SETTINGS = {
    "qwen2_vl": ("Qwen2VLImageProcessorPil", {"min_pixels": 3136, "max_pixels": 12845056}, {}),
    "llava": ("CLIPImageProcessorPil", {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
              {}),
    "internvl": ("GotOcr2ImageProcessorPil", {"size": {"height": 448, "width": 448}, "max_patches": 12},
                 {"crop_to_patches": True}),
}


def jpegs(count: int, size: int = 448) -> list[bytes]:
    from valora.bench.images import ImageRef, render

    out = []
    for i in range(count):
        buf = io.BytesIO()
        render(ImageRef(2 * (i % 22), i // 22, (size, size))).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def processor_dir(family: str, root: Path) -> Path:
    """A tiny checkpoint of the family (tokenizer and config for the processor) with the real image settings."""
    import transformers

    from valora.testing.checkpoints import build_model

    model_dir = build_model(family, root / family)
    cls, kwargs, _ = SETTINGS[family]
    getattr(transformers, cls)(**kwargs).save_pretrained(model_dir)
    return model_dir


def ours(model_dir: Path):
    from transformers import AutoConfig, AutoTokenizer

    from valora.models.registry import resolve_family

    cfg = AutoConfig.from_pretrained(model_dir)
    proc = resolve_family(cfg).processor_cls(model_dir, cfg, AutoTokenizer.from_pretrained(model_dir))
    limits = MultiModalConfig()

    def run(data: bytes) -> str:
        return proc.image_run(load_image(data, limits)).content_hash

    return run


def hf(model_dir: Path, backend: str, call_kwargs: dict):
    from PIL import Image
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(model_dir, backend=backend)

    def run(data: bytes) -> str:
        out = proc(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt", **call_kwargs)
        h = hashlib.blake2b(digest_size=16)
        for v in out.values():
            if isinstance(v, torch.Tensor):
                h.update(v.contiguous().numpy().tobytes())
        return h.hexdigest()

    return run


def throughput(fn, images: list[bytes], threads: int) -> float:
    """Images per second over all of `images` (after one warm-up pass over the first few)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, images[: 2 * threads]))
        t = time.perf_counter()
        list(pool.map(fn, images))
        return len(images) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 images, 1 and 2 threads")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--families", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--tag", default="gpu_host" if torch.cuda.is_available() else "cpu",
                    help="results go to benchmarks/results/preprocess_TAG.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    thread_counts = [1, 2] if args.quick else sorted({1, cores})
    images = jpegs(64 if args.quick else args.images)
    backends = ["pil"]
    try:
        import torchvision  # noqa: F401

        backends.append("torchvision")
    except ImportError:
        pass
    rows = []
    root = Path(tempfile.mkdtemp(prefix="valora-preprocess-"))
    try:
        for family in args.families:
            model_dir = processor_dir(family, root)
            runs = {"ours": ours(model_dir)} | {f"hf-{b}": hf(model_dir, b, SETTINGS[family][2]) for b in backends}
            for name, fn in runs.items():
                for threads in thread_counts:
                    rate = throughput(fn, images, threads)
                    rows.append({"family": family, "impl": name, "threads": threads, "images_per_s": rate})
                    print(f"{family:10s} {name:16s} threads={threads:3d} {rate:9.1f} images/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    path = write_result(f"preprocess_{args.tag}", {
        "cpu_cores": cores, "image": "448x448 JPEG q90", "images": len(images), "quick": args.quick, "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
