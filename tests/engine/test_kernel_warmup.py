"""Start-up builds every LoRA kernel configuration a step can pick (engine/kernel_warmup.py): after it, serving a
mix of adapters, merged and mixture modes, graph and eager steps compiles no LoRA or merge kernel. The build needs a
GPU (Triton's interpreter compiles nothing); the layouts it walks are checked on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_cuda_graphs import _adapters
from tests.orchestrator.test_modes import FixedHot
from valora import LLM, SamplingParams
from valora.engine.kernel_warmup import eager_sizes
from valora.testing.images import random_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton builds kernels for a GPU")


def test_eager_layouts_span_tokens_and_adapters_a_quarter_octave_apart():
    sizes = eager_sizes(2048, 16)
    tokens = sorted({t for t, _ in sizes})
    assert tokens[0] == 1 and tokens[-1] == 2048
    assert all(b / a <= 2 ** 0.25 + 0.2 for a, b in zip(tokens[16:], tokens[17:]))  # past the small integers
    assert {a for _, a in sizes} == {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16}
    assert all(a <= t for t, a in sizes) and len(set(sizes)) == len(sizes)
    assert (2048, 16) in sizes and (3, 3) in sizes and (1, 2) not in sizes


def _compiled() -> int:
    """Kernels Triton holds built for the LoRA and merge kernels, over every device and configuration."""
    from valora.lora.ops import kernels, merge

    fns = (kernels._shrink_kernel, kernels._expand_kernel, kernels._fused_kernel, merge._merge_kernel)
    return sum(len(cache[0]) for fn in fns for cache in fn.device_caches.values())


@needs_cuda
@pytest.mark.families("qwen2_vl")
@pytest.mark.parametrize("eager", [False, True])
def test_serving_compiles_no_lora_kernel_after_startup(family, tiny_model, adapter_factory, eager) -> None:
    adapters = _adapters(family, tiny_model, adapter_factory)
    llm = LLM(str(tiny_model), enable_lora=True, max_loras=4, max_lora_rank=16, dtype="float32", device="cuda",
              max_num_seqs=16, scheduler="valora", enforce_eager=eager, num_kv_blocks=256,
              max_num_batched_tokens=64)
    built = _compiled()
    assert built > 0
    prompts, loras = [], []
    for i in range(20):  # every mode, batches of many sizes and adapter counts, chunks, images
        text = f"request {i} " + "word " * (i % 7) * 3
        prompts.append({"prompt": f"{family.image_prompt} {text}",
                        "multi_modal_data": {"image": random_image(56, 56, seed=i)}} if i % 5 == 0 else text)
        loras.append(adapters[i % len(adapters)] if i % 4 else None)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for hot in (None, adapters[0].lora_name, adapters[1].lora_name):
        llm.engine.core.policy = FixedHot(hot)
        llm.generate(prompts, params, loras, use_tqdm=False)
    assert _compiled() == built
    del llm
    torch.cuda.empty_cache()
