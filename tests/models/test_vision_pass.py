"""One vision pass per step (vlm.VisionPass) for every family: a pass padded to its CUDA-graph bucket gives the real
rows of the unpadded pass (padding rows attend only among themselves), whichever attention backend runs it; the
engine sends passes without vision-side adapters to the graph runner and the others down the eager path, with the
same tokens either way. The capture itself needs a GPU (last test)."""

from __future__ import annotations

import pytest
import torch

from valora import LLM, LoRARequest, SamplingParams
from valora.models.vision_graphs import VisionGraphs
from valora.testing.images import random_image

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(56, 84), (112, 90), (70, 70), (56, 56), (84, 84)]  # Qwen: ragged windows, padding; LLaVA: 5 -> 6 images


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=8, embed_cache_mb=0,
               enable_prefix_caching=False, num_kv_blocks=256)  # every request runs its vision pass


def _images(llm, family, sizes, seed: int = 0):
    text = " ".join(f"{family.image_prompt} picture {i}" for i in range(len(sizes)))
    prompt = {"prompt": text, "multi_modal_data": {"image": [random_image(h, w, seed=seed + i) for i, (h, w) in
                                                             enumerate(sizes)]}}
    return [item.data for item in llm.engine.input_processor.process(prompt)[1].images]


@pytest.mark.parametrize("backend", ["TORCH_SDPA", "TRITON_ATTN"])
def test_padded_pass_keeps_the_real_rows(llm, family, backend):
    model = llm.engine.core.model
    data = _images(llm, family, SIZES)
    with torch.inference_mode():
        plain = model.prepare_vision(data, None, None, backend, pad=False)
        padded = model.prepare_vision(data, None, None, backend, pad=True)
        assert padded.key is not None and plain.key is None
        assert padded.out_rows == plain.out_rows
        ref = model.run_vision(plain)
        got = model.run_vision(padded)
    assert ref.shape[0] == plain.out_rows <= got.shape[0]
    torch.testing.assert_close(got[: padded.out_rows], ref, atol=1e-5, rtol=1e-5)


def test_bucket_holds_any_images_of_its_size(llm, family):
    """Passes over different images that fall in one bucket read tensors of one shape (what a replay refills)."""
    model = llm.engine.core.model
    a = model.prepare_vision(_images(llm, family, [(56, 84)]), None, None, "TRITON_ATTN", pad=True)
    b = model.prepare_vision(_images(llm, family, [(56, 70)]), None, None, "TRITON_ATTN", pad=True)
    assert a.key == b.key
    assert [t.shape for t in a.tensors()] == [t.shape for t in b.tensors()]


@pytest.mark.families("qwen2_vl", "internvl")
def test_engine_routes_passes_by_adapter(llm, family, tiny_model, adapter_factory, monkeypatch):
    """Base and LM-only-adapter requests take the (padded) graph pass, a vision adapter the eager one; greedy tokens
    are those of the engine without vision graphs."""
    vision = adapter_factory(tiny_model, r=4, target_modules=family.targets("vision"), seed=1)
    lm_only = adapter_factory(tiny_model, r=4, target_modules=family.targets("lm"), seed=2)
    loras = [None, LoRARequest("lm", 1, str(lm_only)), LoRARequest("vision", 2, str(vision))]
    image = random_image(84, 56, seed=7)
    prompts = [{"prompt": f"{family.image_prompt} caption :", "multi_modal_data": {"image": image}}] * 3
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    model = llm.engine.core.model
    monkeypatch.setattr(model, "vision_backend", "TRITON_ATTN")

    def generate():
        return [[o.outputs[0].token_ids] for o in (llm.generate(p, params, lr, use_tqdm=False)[0]
                                                     for p, lr in zip(prompts, loras))]

    ref = generate()
    graphs = VisionGraphs(model, capture=False)  # the padded passes, run eagerly
    runs = []
    real_run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda vp: runs.append(vp.key) or real_run(vp))
    monkeypatch.setattr(model, "vision_graphs", graphs)
    assert generate() == ref
    assert len(runs) == 2  # the base request and the LM-only adapter's; not the vision adapter's
    graphs.max_rows = 1  # too big for any bucket: eager
    assert generate() == ref and len(runs) == 2


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("backend", ["TRITON_ATTN", "FLASH_ATTN"])
def test_graph_replay_matches_eager(family, model_factory, backend):
    """bf16 on a GPU: passes replayed from a graph equal the same padded passes run eagerly, for a later image of
    a bucket already captured too (the replay reads the new inputs). A taller image shares the first one's bucket
    where its padding fits (Qwen2-VL, LLaVA), or gets its own (InternVL: one more tile)."""
    llm = LLM(str(model_factory(family.name, initializer_range=0.05)), dtype="bfloat16", embed_cache_mb=0,
              num_kv_blocks=256)  # beside the module's engine: a fixed cache, not a share of the GPU
    model = llm.engine.core.model
    graphs = VisionGraphs(model)
    buckets = []
    for seed, size in enumerate(((56, 84), (70, 84), (56, 84))):
        data = _images(llm, family, [size], seed)
        with torch.inference_mode():
            vp = model.prepare_vision(data, None, None, backend, pad=True)
            eager = model.run_vision(vp)[: vp.out_rows]
            assert torch.equal(graphs.run(vp), eager)
        buckets.append((backend, *vp.key))
    assert buckets[2] == buckets[0]  # the third image replays the first one's graph with its own pixels
    assert len(graphs.graphs) == len(set(buckets)) and all(v is not None for v in graphs.graphs.values())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("backend", ["TRITON_ATTN", "FLASH_ATTN"])
def test_prepare_never_synchronises(family, model_factory, backend):
    """The host part of a pass only queues copies (pinned memory, non-blocking): it may run while the previous
    kernels are still on the device, padded for a graph or not."""
    llm = LLM(str(model_factory(family.name)), dtype="bfloat16", embed_cache_mb=0, num_kv_blocks=256)
    model = llm.engine.core.model
    data = _images(llm, family, SIZES)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pad in (False, True):
            model.prepare_vision(data, None, None, backend, pad=pad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
