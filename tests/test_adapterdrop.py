"""AdapterDrop: fixed and robust dropping, no gradients below the lowest active adapter, less memory."""

from __future__ import annotations

import logging

import pytest
import torch

from mtl.adapters.config import AdapterConfig
from mtl.model import MTLModel
from tests.conftest import tiny_backbone, tiny_batch


def _four_layer_model(**adapter) -> MTLModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    backbone = BertModel(BertConfig(vocab_size=260, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                    intermediate_size=128), add_pooling_layer=False)
    model = MTLModel(backbone)
    model.add_task("t", 3, AdapterConfig(type="houlsby", **adapter))
    with torch.no_grad():
        for p in model.task_parameters("t").values():
            p.normal_(0, 0.1)
    return model


def test_fixed_drop_creates_no_adapters_in_the_first_layers():
    model = _four_layer_model(drop_first=2)
    assert model.adapter_layers("t") == [2, 3]
    robust = _four_layer_model(drop_first=2, robust_drop=True)
    assert robust.adapter_layers("t") == [0, 1, 2, 3]  # robust dropping trains every depth


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_no_gradient_below_the_lowest_active_adapter(k):
    model = _four_layer_model(drop_first=k).train()
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in model.backbone.encoder.layer]
    model(**tiny_batch(), tasks="t")
    for hook in hooks:
        hook.remove()
    assert [o.requires_grad for o in outputs] == [i >= k for i in range(4)]


def _saved_bytes(model: MTLModel, **kwargs) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(**tiny_batch(rows=4, length=16), tasks="t", **kwargs)["t"]
    logits.sum().backward()
    return total


def test_memory_kept_for_backward_falls_as_k_grows():
    saved = [_saved_bytes(_four_layer_model(drop_first=k).train()) for k in range(4)]
    assert all(a > b for a, b in zip(saved, saved[1:])), saved
    robust = _four_layer_model(robust_drop=True).train()
    assert [_saved_bytes(robust, drop_first=k) for k in range(4)] == saved  # same graph as fixed dropping


def test_robust_depth_equals_removing_those_adapters():
    model = _four_layer_model(robust_drop=True).eval()
    batch = tiny_batch()
    dropped = model(**batch, tasks="t", drop_first=2)["t"]
    for slot in model.iter_slots():
        if slot.layer_index < 2:
            del slot.adapters["t"]
    torch.testing.assert_close(dropped, model(**batch, tasks="t")["t"], rtol=0, atol=0)


def test_evaluating_with_more_layers_dropped_is_logged_once(caplog):
    model = _four_layer_model(drop_first=1).eval()
    with caplog.at_level(logging.WARNING, logger="mtl"):
        model(**tiny_batch(), tasks="t", drop_first=1)
        assert not caplog.records
        model(**tiny_batch(), tasks="t", drop_first=3)
        model(**tiny_batch(), tasks="t", drop_first=3)
    assert len(caplog.records) == 1 and "first 3 layers" in caplog.records[0].getMessage()


@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby", "parallel"])
def test_multi_task_forward_shares_layers_below_the_lowest_adapter(kind):
    model = MTLModel(tiny_backbone("bert"))
    for name in ("a", "b", "c"):
        model.add_task(name, 2, AdapterConfig(type=kind, drop_first=1))
        with torch.no_grad():
            for p in model.task_parameters(name).values():
                p.normal_(0, 0.1)
    seen = {}
    layers = model.backbone.encoder.layer
    watched = {"layer 0": layers[0], "layer 1 attention": layers[1].attention.self,
               "layer 1 feed-forward": layers[1].intermediate, "layer 1": layers[1]}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(
        (o[0] if isinstance(o, tuple) else o).shape[0])) for n, m in watched.items()]
    batch = tiny_batch(rows=3)
    together = model(**batch, tasks=["a", "b", "c"])
    for hook in hooks:
        hook.remove()
    # below the first adapter slot everything runs once on the 3 rows; the slot makes 3 copies
    ffn_rows = 9 if kind == "houlsby" else 3  # Houlsby's first slot is after attention
    assert seen == {"layer 0": [3], "layer 1 attention": [3], "layer 1 feed-forward": [ffn_rows], "layer 1": [9]}
    for name in ("a", "b", "c"):
        torch.testing.assert_close(together[name], model(**batch, tasks=name)[name], rtol=1e-5, atol=1e-5)


def test_robust_adapters_evaluate_at_any_depth_without_a_report(caplog):
    model = _four_layer_model(robust_drop=True).eval()
    with caplog.at_level(logging.WARNING, logger="mtl"):
        model(**tiny_batch(), tasks="t", drop_first=3)
    assert not caplog.records
