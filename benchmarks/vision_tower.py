"""The vision pass (tower + projector) of every family at 7B-class tower shapes, ours next to transformers' own
tower on the same checkpoint and the same preprocessed 448x448 images, in one run (issue 17), and the TTFT of one
448x448 image request through the engine with Qwen2-VL-7B shapes.

    python -m benchmarks.vision_tower                       # everything (H100: about 8 minutes)
    python -m benchmarks.vision_tower --families qwen2_vl qwen2_5_vl --skip-ttft   # split over several runs
    python -m benchmarks.vision_tower --families llava internvl --skip-ttft
    python -m benchmarks.vision_tower --ttft-only
    python -m benchmarks.vision_tower --quick               # tiny shapes on the CPU: checks the script end to end

Towers (random bf16 weights saved in the HF format by valora.testing.checkpoints; the LM cut to one layer of the
real width, since only the projector's output width matters here): Qwen2-VL-7B (32 blocks, width 1280, 2x2 merger
to 3584), Qwen2.5-VL-7B (32 blocks, width 1280, SwiGLU 3420, 112-pixel windows, full attention in blocks 7/15/23/31),
LLaVA-1.5-7B's CLIP ViT-L/14-336 (24 layers, width 1024, up to layer -2, MLP projector to 4096), InternVL2-8B's
InternViT-300M-448px (24 layers, width 1024, pixel shuffle, MLP projector to 4096). Images: 448x448, random, in
batches of 1, 8 and 32 (LLaVA's processor resizes them to 336; InternVL cuts each into one 448 tile).

Ours is `embed_images` (host preparation included: what a step pays), per attention backend, eager and replayed
from CUDA graphs (TRITON_ATTN and FLASH_ATTN; graphs allowed at every size here), transformers is
`get_image_features` (its default SDPA attention) on the same pixel tensors. Each is the median of several
synchronised runs after two warm-ups. "Share of the matmul rate" is the pass's matmul FLOPs (every linear layer as
run, plus 4 * span^2 * width per attention layer) over its time, over a dense bf16 8192^3 GEMM rate measured in the
same run. TTFT is benchmarks/engine_speed.py's: engine steps until a one-image chat request with max_tokens=1
finishes (median of 5 new images, the embedding and prefix caches off: the requests repeat across variants), per
vision backend, with the vision graphs on and off.
Results: benchmarks/results/vision_tower.json (rewritten after every family), a table printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
import traceback
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():  # --quick on a CPU: Triton kernels run in its interpreter (set before they exist)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

from benchmarks.common import build_checkpoint, run_info, synchronize, write_result  # noqa: E402
from benchmarks.profiling import format_profile, profile_run  # noqa: E402
from valora import LLM  # noqa: E402
from valora.models.layers import gemm_kernels  # noqa: E402
from valora.models.layers.vit import VisionSpans  # noqa: E402
from valora.models.vision_graphs import VisionGraphs  # noqa: E402
from valora.multimodal.pixels import hf_tensors  # noqa: E402
from valora.testing.checkpoints import build_model  # noqa: E402
from valora.testing.images import random_image  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _lm(hidden: int, heads: int, kv_heads: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=heads,
                num_key_value_heads=kv_heads, max_position_embeddings=4096)


_VIT_L = dict(vision_depth=24, vision_embed_dim=1024, vision_num_heads=16, vision_intermediate_size=4096, patch_size=14)
SHAPES = {
    "qwen2_vl": dict(vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, max_pixels=448 * 448,
                     **_lm(3584, 28, 4)),
    "qwen2_5_vl": dict(vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_intermediate_size=3420,
                       window_size=112, fullatt_block_indexes=(7, 15, 23, 31), max_pixels=448 * 448,
                       **_lm(3584, 28, 4)),
    "llava": dict(image_size=336, vision_feature_layer=-2, **_VIT_L, **_lm(4096, 32, 32)),
    "internvl": dict(image_size=448, max_patches=12, **_VIT_L, **_lm(4096, 32, 8)),
}
QUICK_SHAPES = {"qwen2_vl": dict(max_pixels=112 * 112), "qwen2_5_vl": dict(max_pixels=112 * 112), "llava": {},
                "internvl": {}}
BACKENDS = ("TRITON_ATTN", "FLASH_ATTN", "TORCH_SDPA", "FLEX_ATTENTION")
GRAPH_BACKENDS = ("TRITON_ATTN", "FLASH_ATTN")
PROFILED_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # --profile: their largest pass, with the default variant


def profiled_variant(variants: list[tuple[str, bool]]) -> tuple[str, bool]:
    """The variant a served request takes (the `auto` backend, graphs on a GPU) if it is run, else the first."""
    default = ("TRITON_ATTN", True) if CUDA else ("TORCH_SDPA", False)
    return default if default in variants else variants[0]


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn` over `repeats` synchronised runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        t = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_matmul_rate() -> float:
    """Dense bf16 GEMM rate (8192^3 on a GPU, 1024^3 fp32 on the CPU), best of 10."""
    n, dtype = (8192, torch.bfloat16) if CUDA else (1024, torch.float32)
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    best = min(timed(lambda: a @ b, 1, warmup=1) for _ in range(10))
    return 2 * n**3 / best


def pass_flops(model, data) -> float:
    """Matmul FLOPs of one eager pass: every linear layer as it runs, and 4 * span^2 * width per attention call."""
    total = 0.0

    def linear(module, args, out):
        nonlocal total
        total += 2 * args[0].shape[0] * module.in_features * module.out_features

    def attention(module, args, out):
        nonlocal total
        spans = next(a for a in args if isinstance(a, VisionSpans))
        total += 4 * sum(n * n for n in spans.lengths) * args[0].shape[-1]

    hooks = [m.register_forward_hook(linear) for m in model.vision_layers()]
    hooks += [m.register_forward_hook(attention) for m in model.model.modules()
              if type(m).__name__ in ("VisionAttention", "ViTAttention")]
    try:
        vp = model.prepare_vision(data, None, None, "TORCH_SDPA", pad=False)
        model.run_vision(vp)
    finally:
        for h in hooks:
            h.remove()
    return total


def hf_features(hf, family: str, data: list[dict]) -> torch.Tensor:
    """transformers' image features of the same pixel tensors, [tokens, hidden]."""
    pixels = torch.cat([hf_tensors(d)["pixel_values"] for d in data]).to(DEVICE, hf.dtype)
    kwargs = {"pixel_values": pixels}
    if family.startswith("qwen"):
        kwargs["image_grid_thw"] = torch.cat([d["image_grid_thw"].view(1, 3) for d in data]).to(DEVICE)
    out = hf.model.get_image_features(**kwargs)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
    return out.reshape(-1, out.shape[-1])


def images(llm: LLM, n: int, size: int) -> list[dict]:
    processor = llm.engine.input_processor.processor
    return [processor.image_tensors(random_image(size, size, seed=i)) for i in range(n)]


def bench_family(name: str, workdir: Path, args, rate: float, result: dict, save) -> None:
    """Fills `result` run by run (transformers first, FLEX_ATTENTION, which compiles, last), calling `save` after
    each, so a run cut short keeps what it measured."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    shapes = QUICK_SHAPES[name] if args.quick else SHAPES[name]
    model_dir = workdir / f"{name}-tower"
    t = time.perf_counter()
    build_model(name, model_dir, large=not args.quick, dtype=dtype, device=DEVICE, **shapes)
    print(f"{name}: checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    llm = LLM(str(model_dir), device=DEVICE, max_model_len=2048, max_num_seqs=4, num_kv_blocks=256,
              enforce_eager=True, embed_cache_mb=0)
    model = llm.engine.core.model
    size = 448 if not args.quick else 56
    result |= {**run_info(), "shapes": shapes, "image_size": size, "runs": []}
    batches = {n: images(llm, n, size) for n in args.images}
    outputs: dict[str, torch.Tensor] = {}  # the first batch's embeddings per implementation

    def record(run: dict, n: int, fn, key: str) -> None:
        data = batches[n]
        run |= {"images": n, "rows": model.vision_rows(data), "flops": flops[n]}
        try:
            out = fn()
            if n == args.images[0]:
                outputs[key] = out.float().cpu()
            run |= _rates(timed(fn, args.repeats if n < 32 else max(3, args.repeats // 2)), n, flops[n], rate)
        except Exception as e:  # noqa: BLE001 - one implementation failing must not lose the others' numbers
            run["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        save()

    with torch.inference_mode():
        flops = {n: pass_flops(model, data) for n, data in batches.items()}
        if not args.skip_hf:
            from transformers import AutoModelForImageTextToText

            hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()
            for n, data in batches.items():
                record({"impl": "transformers", "attn_implementation": hf.config._attn_implementation}, n,
                       partial(hf_features, hf, name, data), "transformers")
            del hf
            _free()
        variants = [(b, True) for b in args.backends if b in GRAPH_BACKENDS and CUDA]
        variants += sorted(((b, False) for b in args.backends), key=lambda v: v[0] == "FLEX_ATTENTION")
        # the default variant once more with the MLPs' first GEMM carrying the activation (VALORA_GEMM_EPILOGUE=1)
        runs = [(*v, False) for v in variants]
        if CUDA:
            runs.insert(1, (*profiled_variant(variants), True))
        for backend, graphs, epilogue in runs:
            model.vision_backend = backend
            model.vision_graphs = VisionGraphs(model, max_rows=1 << 30) if graphs else None
            gemm_kernels.ENABLED = epilogue
            for n, data in batches.items():
                run = {"impl": "valora", "backend": backend, "graphs": graphs, "gemm_epilogue": epilogue}
                record(run, n, partial(model.embed_images, data, [-1] * n, None),
                       f"{backend}{'+graphs' if graphs else ''}{'+epilogue' if epilogue else ''}")
                if "error" not in run:
                    run["prepare_ms"] = timed(partial(model.prepare_vision, data, None, None, backend, graphs),
                                              max(2, args.repeats // 3)) * 1e3
                    if args.profile and name in PROFILED_FAMILIES and n == max(batches) and \
                            (backend, graphs) == profiled_variant(variants) and not epilogue:
                        result["profile"] = profile_run(partial(model.embed_images, data, [-1] * n, None), phases=[
                            (model, "prepare_vision", "prepare (host)"), (model, "run_vision", "run (eager)"),
                            (model.vision_graphs, "run", "graph run (refill + replay)")])
                        result["profile"] |= {"images": n, "backend": backend, "graphs": graphs}
            if graphs and not epilogue:
                result.setdefault("capture_s", {})[backend] = model.vision_graphs.capture_seconds
            model.vision_graphs = None
        gemm_kernels.ENABLED = False
        result["mlp_epilogue"] = bench_mlp_epilogue(model, model.vision_rows(batches[max(batches)]), args.repeats)
        print(json.dumps({"mlp_epilogue": result["mlp_epilogue"]}), flush=True)
    model.vision_backend = "auto"
    ref = outputs.get("transformers")
    if ref is not None:  # how far each of ours is from transformers' features (bf16: about 1e-2)
        result["relative_error_vs_transformers"] = {
            k: float((v - ref).norm() / ref.norm()) if v.shape == ref.shape else f"shape {tuple(v.shape)}"
            for k, v in outputs.items() if k != "transformers"}
    save()
    del llm
    _free()
    shutil.rmtree(model_dir, ignore_errors=True)


def bench_mlp_epilogue(model, rows: int, repeats: int) -> dict:
    """The tower's first MLP over `rows` random rows with the activation as its own kernel and in the first GEMM's
    epilogue (layers/gemm_kernels.py): ms each, what decides VALORA_GEMM_EPILOGUE's default."""
    from valora.models.layers.mlp import MLP, GatedMLP

    name, mlp = next((n, m) for n, m in model.model.named_modules()
                     if isinstance(m, (MLP, GatedMLP)) and not n.startswith("language_model."))
    first = mlp.fc1 if isinstance(mlp, MLP) else mlp.gate_up_proj
    x = torch.randn(rows, first.in_features, device=DEVICE, dtype=first.weight.dtype)
    result = {"module": name, "rows": rows, "in": first.in_features, "out": first.out_features}
    saved = gemm_kernels.MIN_ROWS
    gemm_kernels.MIN_ROWS = 0  # every size takes it while measured
    try:
        for key, on in (("separate_ms", False), ("epilogue_ms", True)):
            gemm_kernels.ENABLED = on
            result[key] = timed(lambda: mlp(x, None), repeats) * 1e3
    finally:
        gemm_kernels.ENABLED, gemm_kernels.MIN_ROWS = False, saved
    return result


def _rates(secs: float, n: int, flops: float, rate: float) -> dict:
    return {"ms": secs * 1e3, "ms_per_image": secs * 1e3 / n, "tflops": flops / secs / 1e12,
            "matmul_share": flops / secs / rate}


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def profile_ttft(llm: LLM) -> dict:
    """The engine steps of one image request (max_tokens=1), profiled; the request is added (preprocessed) outside
    what is measured, as in the TTFT."""
    from benchmarks.engine_speed import image_request
    from valora import SamplingParams
    from valora.engine import model_runner, sampler

    engine, seeds = llm.engine, iter(range(1000, 2000))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def add() -> None:
        seed = next(seeds)
        engine.add_request(f"profiled-{seed}", image_request(llm, seed), params, None)

    def steps() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    core = engine.core
    model = core.model
    phases = [(core.scheduler, "schedule", "schedule"), (core.runner, "prepare", "runner.prepare (batch)"),
              (model, "embed", "embed (tokens + images)"), (model, "prepare_vision", "vision prepare"),
              (core.runner.token_graphs, "run", "prefill graph (fill + replay)"),
              (model.language_model, "forward", "LM layers (eager launches)"), (model, "compute_logits", "lm_head"),
              (model_runner, "sample_async", "sampler (launch)"), (sampler.PendingSample, "result", "wait for tokens"),
              (core, "_collect", "collect"), (engine.output_processor, "process_outputs", "outputs (text)")]
    return profile_run(steps, phases, setup=add)


def bench_ttft(workdir: Path, args) -> dict:
    """TTFT of one 448x448 image request (engine_speed's definition) per vision backend, vision graphs on and off;
    on a GPU also the default variant with the LM's prefill run eagerly instead of from its graph."""
    from benchmarks.engine_speed import hf_ttft, ours_ttft

    model_dir, _ = build_checkpoint(workdir, 0, 16, quick=args.quick)
    t = time.perf_counter()
    llm = LLM(str(model_dir), device=DEVICE, max_model_len=4096, max_num_seqs=4, gpu_memory_utilization=0.5,
              embed_cache_mb=0, enable_prefix_caching=False)  # every request pays its whole prefill
    result: dict = {**run_info(), "start_s": time.perf_counter() - t, "runs": []}
    runner = llm.engine.core.runner
    model, graphs, token_graphs = runner.model, runner.model.vision_graphs, runner.token_graphs
    # (on the CPU only SDPA: a request through the interpreted Triton kernels takes a minute and measures nothing)
    variants = [(b, True) for b in args.backends if b in GRAPH_BACKENDS and CUDA] + \
        [(b, False) for b in args.backends if b != "FLEX_ATTENTION" and (CUDA or b == "TORCH_SDPA")]
    profiled = profiled_variant(variants)
    runs = [(*v, True) for v in variants] + ([(*profiled, False)] if token_graphs is not None else [])
    for backend, use_graphs, lm_graphs in runs:
        run = {"backend": backend, "graphs": use_graphs, "prefill_graphs": lm_graphs and token_graphs is not None}
        try:
            model.vision_backend = backend
            model.vision_graphs = graphs if use_graphs else None
            runner.token_graphs = token_graphs if lm_graphs else None
            ours_ttft(llm, repeats=2)  # warm-up: Triton compiles, the bucket's graph is captured
            run["ttft_ms"] = ours_ttft(llm) * 1e3
            data = images(llm, 1, 448)
            with torch.inference_mode():
                run["vision_pass_ms"] = timed(partial(model.embed_images, data, [-1], None), args.repeats) * 1e3
            if args.profile and (backend, use_graphs, lm_graphs) == (*profiled, True):
                result["profile"] = profile_ttft(llm) | {"backend": backend, "graphs": use_graphs}
        except Exception as e:  # noqa: BLE001
            run["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    model.vision_backend, model.vision_graphs, runner.token_graphs = "auto", graphs, token_graphs
    del llm, graphs, token_graphs, runner, model
    _free()
    if not args.skip_hf and CUDA:
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).to(DEVICE).eval()
        hf_ttft(hf, model_dir)  # warm-up
        result["transformers_ttft_ms"] = hf_ttft(hf, model_dir) * 1e3
        print(f"transformers ttft {result['transformers_ttft_ms']:.1f} ms", flush=True)
        del hf
        _free()
    return result


def print_tables(result: dict) -> None:
    print(f"\n{'family':11s} {'images':>6s} {'implementation':28s} {'ms':>8s} {'ms/img':>7s} {'TFLOP/s':>8s} "
          f"{'matmul%':>7s} {'vs HF':>6s}")
    for name, fam in result["families"].items():
        hf = {r["images"]: r.get("ms") for r in fam["runs"] if r["impl"] == "transformers"}
        for r in fam["runs"]:
            epi = " +epilogue" if r.get("gemm_epilogue") else ""
            impl = "transformers" if r["impl"] == "transformers" else \
                f"valora {r['backend']}{' +graphs' if r['graphs'] else ''}{epi}"
            if "error" in r:
                print(f"{name:11s} {r['images']:6d} {impl:28s} error: {r['error'][:60]}")
                continue
            ref = hf.get(r["images"])
            speedup = f"{ref / r['ms']:5.2f}x" if ref else "-"
            print(f"{name:11s} {r['images']:6d} {impl:28s} {r['ms']:8.2f} {r['ms_per_image']:7.2f} "
                  f"{r['tflops']:8.1f} {100 * r['matmul_share']:6.1f}% {speedup:>6s}")
    mlps = {name: fam["mlp_epilogue"] for name, fam in result["families"].items() if "mlp_epilogue" in fam}
    if mlps:
        print("\nfirst MLP of the tower at the largest batch: activation as its own kernel vs in the GEMM's epilogue")
        for name, m in mlps.items():
            print(f"  {name:11s} {m['rows']:6d} x {m['in']:4d} -> {m['out']:5d}: {m['separate_ms']:7.3f} ms vs "
                  f"{m['epilogue_ms']:7.3f} ms ({m['separate_ms'] / m['epilogue_ms']:.2f}x)")
    if "ttft" in result:
        t = result["ttft"]
        print(f"\nTTFT, one 448x448 image (Qwen2-VL-7B shapes); transformers: {t.get('transformers_ttft_ms', '-')}")
        for r in t["runs"]:
            lm = ", LM eager" if r.get("prefill_graphs") is False else ""  # (run 1 predates prefill graphs)
            tag = f"{r['backend']}{' +graphs' if r['graphs'] else ''}{lm}"
            print(f"  {tag:34s} " + (f"TTFT {r['ttft_ms']:7.2f} ms, vision pass {r['vision_pass_ms']:6.2f} ms"
                                     if "error" not in r else f"error: {r['error'][:80]}"))


def print_profiles(result: dict, args) -> None:
    """The profiles this run took (the families' and the TTFT's), last in the output."""
    families = [] if args.ttft_only else args.families
    sections = [(f"{name}, {p['images']} images, {p['backend']}{' +graphs' if p['graphs'] else ''}", p)
                for name in families if (p := result["families"][name].get("profile"))]
    if not args.skip_ttft and (p := result["ttft"].get("profile")) is not None:
        sections.append((f"TTFT request steps, {p['backend']}{' +graphs' if p['graphs'] else ''}", p))
    for title, p in sections:
        print("\n" + format_profile(p, title))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-vision"))
    ap.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--images", default="1,8,32", help="batch sizes in images (default: 1,8,32)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-hf", action="store_true", help="ours only")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--ttft-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU): checks the script end to end")
    ap.add_argument("--profile", action="store_true",
                    help="also profile, once each after warm-up, the TTFT request's steps and the largest Qwen2-VL and "
                         "Qwen2.5-VL passes (first variant): GPU busy vs wall, kernels, host phases and ops")
    ap.add_argument("--name", default=None, help="result name (default: vision_tower, vision_tower_quick)")
    args = ap.parse_args()
    args.images = [int(n) for n in args.images.split(",")]
    if args.quick:
        args.images = [1, 2] if args.images == [1, 8, 32] else args.images
        args.backends = [b for b in args.backends if CUDA or b in ("TRITON_ATTN", "TORCH_SDPA")]
        args.repeats = min(args.repeats, 2)
    name = args.name or ("vision_tower_quick" if args.quick else "vision_tower")
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = Path(os.environ.get("OUT", "benchmarks/results")) / f"{name}.json"
    # a later run of some families (or of the TTFT alone) adds to what an earlier one wrote
    result: dict = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    result.setdefault("families", {})
    result |= {"transformers": transformers.__version__, "matmul_flops_per_s": measure_matmul_rate()}
    print(f"matmul rate {result['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    if not args.ttft_only:
        for fam in args.families:
            result["families"][fam] = {}
            bench_family(fam, args.workdir, args, result["matmul_flops_per_s"], result["families"][fam],
                         partial(write_result, name, result))
    if not args.skip_ttft:
        result["ttft"] = bench_ttft(args.workdir, args)
    print(f"written {write_result(name, result)}")
    print_tables(result)
    print_profiles(result, args)


if __name__ == "__main__":
    main()
