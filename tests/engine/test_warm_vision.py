"""The vision warm-up a GPU server runs before its first request (LLMEngine.warm_vision): a real image prompt
through the vision pass and the LM on scratch blocks, for every family; it leaves nothing behind (blocks,
requests, cached embeddings), and a failure only logs. On the CPU it is called directly (the server runs it on GPUs,
where it builds the tower's kernels)."""

from __future__ import annotations

import logging

from valora import LLM


def test_warm_up_runs_an_image_and_leaves_no_trace(family, tiny_model, monkeypatch):
    llm = LLM(str(tiny_model), dtype="float32", device="cpu")
    core = llm.engine.core
    free, embed, passes = core.blocks.num_free, core.model.embed_images, []
    monkeypatch.setattr(core.model, "embed_images", lambda data, *a: passes.append(len(data)) or embed(data, *a))
    assert core.warm_vision(size=56)
    assert passes == [1]  # one image through the vision pass
    assert core.blocks.num_free == free and not core.requests and not core.scheduler.has_work()
    assert core.embed_cache is None or core.embed_cache.used == 0


def test_a_failed_warm_up_only_logs(family, tiny_model, caplog, monkeypatch):
    llm = LLM(str(tiny_model), dtype="float32", device="cpu")
    core = llm.engine.core

    def broken(*args, **kwargs):
        raise RuntimeError("no vision today")

    monkeypatch.setattr(core.model, "embed_images", broken)
    with caplog.at_level(logging.WARNING):
        assert not core.warm_vision(size=56)
    assert "vision warm-up failed (RuntimeError: no vision today)" in caplog.text
