"""Heads in the engine: a request that asks for a head ends after its prefill, with the head's answer on the same
hidden state the training code pools (Hugging Face + PEFT at the last prompt token), in any batch and mode."""

from __future__ import annotations

import pytest
import torch

from valora import LLM, LoRARequest, SamplingParams
from valora.heads import HeadParams, load_heads, pool_last
from valora.multimodal.inputs import InputError
from valora.testing.images import random_image
from valora.training.encoder import ChatEncoder

from .conftest import hidden_size

pytestmark = pytest.mark.families("qwen2_vl")
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def llm(head_model):
    return LLM(str(head_model), enable_lora=True, max_loras=2, num_kv_blocks=256, device="cpu")


def prompt(llm: LLM, seed: int) -> dict:
    return llm.chat_prompt([{"role": "user", "content": [{"type": "image", "image": random_image(56, 56, seed=seed)},
                                                         {"type": "text", "text": QUESTION}]}])


def reference(model_dir, adapter, seeds: list[int]) -> list[torch.Tensor]:
    """The pooled hidden state as training computes it: HF + PEFT on right-padded rows from `ChatEncoder`."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    hf = PeftModel.from_pretrained(base, adapter).eval()
    enc = ChatEncoder(model_dir)
    images = enc.images([random_image(56, 56, seed=s) for s in seeds])
    batch = enc.batch([enc.row(QUESTION, img) for img in images])
    batch.pop("labels")
    with torch.no_grad():
        hidden = hf.base_model.model.model(**batch).last_hidden_state
    return list(pool_last(hidden, batch["attention_mask"]))


def test_head_answer_matches_training_and_needs_no_decode_step(llm, head_model, head_adapters):
    lora = LoRARequest("one", 1, str(head_adapters["one"]))
    engine = llm.engine
    text = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, seed in enumerate([1, 2, 3]):
        engine.add_request(f"h{i}", prompt(llm, seed), HeadParams(), lora)
    engine.add_request("t", prompt(llm, 4), text, lora)  # a decoding request in the same batch
    first = {o.request_id: o for o in engine.step()}
    assert all(first[f"h{i}"].finished for i in range(3)) and not first["t"].finished
    head = load_heads("one", head_adapters["one"], hidden_size(head_model)).heads["kind"]
    for i, pooled in enumerate(reference(head_model, head_adapters["one"], [1, 2, 3])):
        c = first[f"h{i}"].outputs[0]
        assert c.token_ids == [] and c.finish_reason == "stop" and c.text == c.head.label
        expected = head(pooled[None]).softmax(-1)[0]
        torch.testing.assert_close(torch.tensor(list(c.head.scores.values())), expected, atol=2e-5, rtol=1e-4)
    while engine.has_unfinished_requests():
        done = {o.request_id: o for o in engine.step() if o.finished}
    alone = llm.generate([prompt(llm, 4)], text, lora, use_tqdm=False)[0].outputs[0]
    assert done["t"].outputs[0].token_ids == alone.token_ids and len(alone.token_ids) == 6


def test_box_head_and_named_heads(llm, head_adapters):
    lora = LoRARequest("two", 2, str(head_adapters["two"]))
    out = llm.generate([prompt(llm, 5)] * 2, [HeadParams("where"), HeadParams("kind")], lora, use_tqdm=False)
    box, kind = (o.outputs[0].head for o in out)
    assert box.head == "where" and len(box.box) == 4 and box.scores is None and out[0].outputs[0].text == box.label
    assert kind.head == "kind" and set(kind.scores) == {"cat", "dog", "bird"}


@pytest.mark.parametrize("params, lora, message", [
    (HeadParams(), None, "only a LoRA adapter with a task head"),
    (HeadParams(), "plain", "'plain' has none"),
    (HeadParams(), "two", "several heads"),
    (HeadParams("size"), "one", "no head 'size'"),
])
def test_requests_a_head_cannot_answer_are_refused(llm, head_adapters, params, lora, message):
    req = None if lora is None else LoRARequest(lora, 10 + len(lora), str(head_adapters[lora]))
    with pytest.raises(InputError, match=message):
        llm.engine.add_request(f"bad-{lora}-{params.head}", prompt(llm, 0), params, req)
    assert not llm.engine.has_unfinished_requests()


def test_heads_leave_with_their_adapter(llm, head_adapters):
    engine = llm.engine
    engine.core.add_lora(LoRARequest("gone", 20, str(head_adapters["one"])))
    assert engine.core.heads["gone"] is not None
    engine.core.remove_lora("gone")
    assert "gone" not in engine.core.heads


def test_same_answers_in_every_mode(head_model, head_adapters):
    """The valora policy merges the hot adapter; S-LoRA's never does: the heads answer the same either way."""
    answers = {}
    for scheduler in ("valora", "slora"):
        llm = LLM(str(head_model), enable_lora=True, max_loras=2, num_kv_blocks=256, device="cpu",
                  scheduler=scheduler)
        lora = LoRARequest("one", 1, str(head_adapters["one"]))
        outs = llm.generate([prompt(llm, s) for s in range(12)], HeadParams(), lora, use_tqdm=False)
        answers[scheduler] = torch.tensor([list(o.outputs[0].head.scores.values()) for o in outs])
        steps = llm.engine.core.stats().mode_steps
        assert steps.get("merged", 0) > 0 if scheduler == "valora" else steps.get("merged", 0) == 0, steps
    torch.testing.assert_close(answers["valora"], answers["slora"], atol=1e-4, rtol=1e-4)


def test_same_answers_from_chunks_and_from_a_cached_prefix(head_model, head_adapters):
    """A head reads the hidden state of the last prompt token: the same whether the prompt is computed whole, in
    chunks of a few tokens (its image split between them), or all but that last token come from the prefix cache."""
    lora = LoRARequest("two", 2, str(head_adapters["two"]))  # its vision tower is adapted too
    answers = {}
    for name, options in (("whole", dict(enable_chunked_prefill=False, enable_prefix_caching=False)),
                          ("chunks", dict(max_num_seqs=4, max_num_batched_tokens=4))):
        llm = LLM(str(head_model), enable_lora=True, max_loras=2, num_kv_blocks=256, device="cpu", block_size=4,
                  **options)
        p = prompt(llm, 9)
        outs = [llm.generate(p, HeadParams("kind"), lora, use_tqdm=False)[0] for _ in range(2)]
        answers[name] = torch.tensor([list(o.outputs[0].head.scores.values()) for o in outs])
        n = len(llm.engine.input_processor.process(p)[1].token_ids)
        assert [o.num_cached_tokens for o in outs] == [0, 0 if name == "whole" else (n - 1) // 4 * 4]
    torch.testing.assert_close(answers["chunks"], answers["whole"], atol=1e-5, rtol=1e-5)


def test_asynchronous_scheduling_gives_the_same_answers(head_model, head_adapters) -> None:
    """Heads end after their prefill, so they are never in a step launched ahead; the decoding rows beside them
    are, with the same tokens as the synchronous loop."""
    lora = LoRARequest("one", 1, str(head_adapters["one"]))
    prompts = [f"what is this? {i}" for i in range(4)]
    params = [HeadParams() if i % 2 else SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
              for i in range(4)]
    outs = {}
    for on in (False, True):
        llm = LLM(str(head_model), enable_lora=True, max_loras=2, dtype="float32", device="cpu",
                  async_scheduling=on)
        results = llm.generate(prompts, params, [lora] * 4, use_tqdm=False)
        outs[on] = [(o.outputs[0].token_ids, o.outputs[0].head.label if o.outputs[0].head else None) for o in results]
    assert outs[True] == outs[False]
    assert all(label is not None for _, label in outs[True][1::2])
