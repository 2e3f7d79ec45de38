"""The heads on their own: file format, pooling, box geometry, losses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from valora.heads import HeadConfig, HeadSet, TaskHead, answer_all, load_heads, pool_last, save_heads
from valora.heads.boxes import box_loss, format_box, iou, parse_box
from valora.heads.losses import classify_loss
from valora.lora.adapter import AdapterError


def _heads() -> dict[str, TaskHead]:
    torch.manual_seed(0)
    return {"kind": TaskHead(HeadConfig("kind", "classify", 16, 8, ("a", "b", "c"))),
            "where": TaskHead(HeadConfig("where", "box", 16, 8))}


def test_save_load_round_trip(tmp_path):
    heads = _heads()
    save_heads(tmp_path, heads, default="kind")
    loaded = load_heads("x", tmp_path, hidden_size=16)
    assert loaded.default == "kind" and set(loaded.heads) == {"kind", "where"}
    x = torch.randn(5, 16)
    for name, head in heads.items():
        torch.testing.assert_close(loaded.heads[name](x), head(x))
    meta = json.loads((tmp_path / "heads.json").read_text())
    assert meta["format"] == "valora-heads" and meta["heads"][0]["labels"] == ["a", "b", "c"]
    assert load_heads("x", tmp_path / "missing", 16) is None  # no heads.json: an adapter without heads


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "heads.json").write_text("{"), "corrupt heads.json"),
    (lambda d: (d / "heads.safetensors").unlink(), "cannot load heads.safetensors"),
    (lambda d: (d / "heads.safetensors").write_bytes(b"junk"), "cannot load heads.safetensors"),
])
def test_damaged_files_are_refused_with_the_reason(tmp_path, damage, message):
    save_heads(tmp_path, _heads())
    damage(tmp_path)
    with pytest.raises(AdapterError, match=message):
        load_heads("x", tmp_path, 16)


def test_heads_of_another_model_are_refused(tmp_path):
    save_heads(tmp_path, _heads())
    with pytest.raises(AdapterError, match="width 16 but the model's is 32"):
        load_heads("x", tmp_path, 32)


def test_which_head_answers():
    kind, where = _heads().values()
    assert HeadSet({"kind": kind}).resolve(None) == "kind"  # the only head
    assert HeadSet({"kind": kind, "where": where}, default="where").resolve(None) == "where"
    assert HeadSet({"kind": kind, "where": where}).resolve("kind") == "kind"
    with pytest.raises(KeyError, match="several heads"):
        HeadSet({"kind": kind, "where": where}).resolve(None)
    with pytest.raises(KeyError, match="no head 'size'"):
        HeadSet({"kind": kind}).resolve("size")


def test_pool_last_reads_the_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_last(hidden, mask), torch.stack([hidden[0, 1], hidden[1, 3]]))


def test_answers_come_back_in_order_per_head():
    heads = _heads()
    x = torch.randn(3, 16)
    out = answer_all([(heads["kind"], x[0]), (heads["where"], x[1]), (heads["kind"], x[2])])
    assert [o.head for o in out] == ["kind", "where", "kind"]
    probs = heads["kind"](x[[0, 2]]).softmax(-1)
    assert [o.label for o in (out[0], out[2])] == [("a", "b", "c")[int(i)] for i in probs.argmax(-1)]
    assert sum(out[0].scores.values()) == pytest.approx(1.0)
    box = out[1].box
    assert 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1 and out[1].label == format_box(box)


def test_box_text_and_overlap():
    assert format_box([0.12, 0.3, 0.555, 1.2]) == "(12,30),(56,100)"
    assert parse_box("the digit is at (12,30),(56,100).") == [0.12, 0.3, 0.56, 1.0]
    assert parse_box("somewhere") is None
    assert iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == pytest.approx(1.0)
    assert iou([0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5]) == pytest.approx(1 / 3)
    assert iou(None, [0, 0, 1, 1]) == 0.0
    target = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    assert box_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert box_loss(torch.tensor([[0.6, 0.6, 0.9, 0.9]]), target) > box_loss(torch.tensor([[0.2, 0.2, 0.5, 0.6]]),
                                                                             target)


def test_distillation_loss():
    logits = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    assert classify_loss(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item())
    # A teacher that agrees with the student (at the same temperature) adds nothing: KL is zero.
    agreeing = F.softmax(logits, -1)
    loss = classify_loss(logits, target, agreeing, alpha=0.5, temperature=1.0)
    assert loss.item() == pytest.approx(0.5 * F.cross_entropy(logits, target).item(), rel=1e-5)
    # A teacher sure of other classes pulls the loss up, and its gradient points the student towards them.
    other = F.one_hot((target + 1) % 5, 5).float()
    student = logits.clone().requires_grad_(True)
    classify_loss(student, target, other, alpha=1.0).backward()
    assert (student.grad.gather(1, ((target + 1) % 5)[:, None]) < 0).all()
