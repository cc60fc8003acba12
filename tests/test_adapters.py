"""Adapter semantics: identity at init, AdapterHub formulas, exact parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from mtl.adapters.bottleneck import BottleneckAdapter, grouped_outputs
from mtl.adapters.config import AdapterConfig
from mtl.adapters.inject import Routing, Target
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from tests.conftest import tiny_backbone, tiny_batch

PRESETS = ["pfeiffer", "houlsby", "parallel"]


@pytest.mark.parametrize("preset", PRESETS)
def test_fresh_adapter_is_exact_identity(family, preset):
    backbone = tiny_backbone(family)
    batch = tiny_batch()
    expected = backbone(**batch).last_hidden_state
    model = MTLModel(backbone)
    model.add_task("t", 3, preset)
    got = model.encode(batch["input_ids"], batch["attention_mask"], None, [(Target("t"), slice(None))])
    assert torch.equal(got, expected)


def test_layer_loop_equals_backbone_forward(family):
    backbone = tiny_backbone(family)
    batch = tiny_batch()
    expected = backbone(**batch).last_hidden_state
    model = MTLModel(backbone)
    assert torch.equal(model.encode(batch["input_ids"], batch["attention_mask"], None, []), expected)
    full = tiny_batch(rows=3, length=5)
    full["attention_mask"][:] = 1  # no padding: the backbone passes no mask at all
    assert torch.equal(model.encode(full["input_ids"], full["attention_mask"], None, []),
                       backbone(**full).last_hidden_state)


def _randomise(model: MTLModel, task: str) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.task_parameters(task).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _hand_formula(preset: str, adapter, h, x, ln):
    relu, swish = torch.relu, torch.nn.functional.silu
    if preset == "pfeiffer":
        z = ln(h + x)
        return ln(adapter.up(relu(adapter.down(z))) + h + x)
    if preset == "houlsby":
        return ln(adapter.up(swish(adapter.down(h))) + h + x)
    return ln(h + 4.0 * adapter.up(relu(adapter.down(x))) + x)


@pytest.mark.parametrize("preset", PRESETS)
def test_ffn_slot_matches_adapterhub_formula(preset):
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("t", 2, preset)
    _randomise(model, "t")
    slot = model.slots[1]["ffn"]
    h_in, x = torch.randn(2, 5, 128), torch.randn(2, 5, 64)
    with model.context.use(Routing([(Target("t"), slice(None))])):
        got = slot(h_in, x)
    h = slot.base.dense(h_in)
    expected = _hand_formula(preset, slot.adapters["t"], h, x, slot.base.LayerNorm)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, slot.base.LayerNorm(h + x))  # the adapter really acts


def test_houlsby_attention_slot_on_distilbert_block_style():
    model = MTLModel(tiny_backbone("distilbert"))
    model.add_task("t", 2, "houlsby")
    _randomise(model, "t")
    block = model.backbone.transformer.layer[0]
    x = torch.randn(2, 5, 64)
    with model.context.use(Routing([(Target("t"), slice(None))])):
        got = block(x)
    attn = block.attention.base(x)[0]
    adapters = model.slots[0]
    a = adapters["attn"].adapters["t"]
    mid = block.sa_layer_norm(a.up(torch.nn.functional.silu(a.down(attn))) + attn + x)
    f = adapters["ffn"].adapters["t"]
    ffn = block.ffn.base(mid)
    expected = block.output_layer_norm(f.up(torch.nn.functional.silu(f.down(ffn))) + ffn + mid)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _adapter_params(model: MTLModel, task: str) -> int:
    return sum(p.numel() for k, p in model.task_parameters(task).items() if k.startswith("adapters."))


def test_parameter_counts_minilm_shape():
    config = BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)
    model = MTLModel(BertModel(config, add_pooling_layer=False))
    for preset in PRESETS:
        model.add_task(preset, 5, preset)
    one = 384 * 24 + 24 + 24 * 384 + 384
    assert _adapter_params(model, "pfeiffer") == 6 * one == 113_040
    assert _adapter_params(model, "houlsby") == 2 * 6 * one
    assert _adapter_params(model, "parallel") == 6 * one
    head = sum(p.numel() for k, p in model.task_parameters("pfeiffer").items() if k.startswith("head."))
    assert head == 384 * 384 + 384 + 384 * 5 + 5


def test_leave_out_and_bottleneck_size():
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("t", 2, AdapterConfig(type="pfeiffer", bottleneck_size=8, leave_out=[0]))
    assert model.adapter_layers("t") == [1]
    assert _adapter_params(model, "t") == 64 * 8 + 8 + 8 * 64 + 64


def test_bert_init_is_not_identity_and_mam_is():
    for init, identity in (("bert", False), ("mam", True)):
        backbone = tiny_backbone("bert")
        batch = tiny_batch()
        expected = backbone(**batch).last_hidden_state
        model = MTLModel(backbone)
        model.add_task("t", 2, AdapterConfig(type="houlsby", init=init))
        got = model.encode(batch["input_ids"], batch["attention_mask"], None, [(Target("t"), slice(None))])
        assert torch.equal(got, expected) is identity


@pytest.mark.parametrize("bad", [dict(type="lora"), dict(positions=["mlp"]), dict(non_linearity="cube"),
                                 dict(init="xavier"), dict(reduction_factor=0), dict(dropout=1.5)])
def test_bad_adapter_config_names_the_key(bad):
    with pytest.raises(MTLConfigError) as err:
        AdapterConfig(**bad)
    assert next(iter(bad)) in str(err.value)


def test_leave_out_out_of_range():
    model = MTLModel(tiny_backbone("bert"))
    with pytest.raises(MTLConfigError, match="leave_out"):
        model.add_task("t", 2, AdapterConfig(leave_out=[5]))


@pytest.mark.parametrize("counts", [[1, 1, 1, 1, 1], [3, 1, 2, 1, 4], [2, 2, 2, 2, 2]])
def test_grouped_outputs_equal_each_adapter_on_its_own_rows(counts):
    torch.manual_seed(0)
    adapters = [BottleneckAdapter(16, AdapterConfig(type="pfeiffer", reduction_factor=4, scaling=s))
                for s in (1.0, 2.0, 1.0, 0.5, 1.0)]
    for adapter in adapters:
        torch.nn.init.normal_(adapter.up.weight)
        torch.nn.init.normal_(adapter.up.bias)
    z = torch.randn(sum(counts), 3, 16)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    loop = torch.cat([a.up_output(z[s:s + c]) for a, s, c in zip(adapters, starts, counts)])
    assert torch.allclose(grouped_outputs(adapters, counts, z), loop, atol=1e-6)
    wider = adapters[:4] + [BottleneckAdapter(16, AdapterConfig(type="pfeiffer", reduction_factor=2))]
    assert grouped_outputs(wider, counts, z) is None  # widths differ: the caller loops per adapter


def test_a_many_task_row_batch_takes_the_grouped_path_and_equals_each_row_alone(monkeypatch):
    from mtl.adapters.inject import AdapterSlot
    from mtl.model import MTLModel
    from tests.conftest import tiny_backbone, tiny_batch

    model = MTLModel(tiny_backbone("bert"))
    names = [f"t{i}" for i in range(5)]
    for i, name in enumerate(names):
        model.add_task(name, 3, "pfeiffer" if i < 4 else "houlsby")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.task_parameters(name).values():
                p.add_(torch.randn_like(p) * 0.3)
    grouped, original = [], AdapterSlot._grouped
    monkeypatch.setattr(AdapterSlot, "_grouped", lambda self, *a: grouped.append(original(self, *a)) or grouped[-1])
    batch = tiny_batch(rows=9, length=7)
    for row_tasks in (["t0", "t1", "t2", "t3", "t0", "t2", "t1", "t3", "t3"], ["t0", "t1", "t4", "t2", "t3", "t0", "t4", "t1", "t2"]):
        grouped.clear()
        with torch.no_grad():
            out = model(**batch, row_tasks=row_tasks)
            seen = dict.fromkeys(row_tasks, 0)
            for row, task in enumerate(row_tasks):
                alone = model(batch["input_ids"][row:row + 1], batch["attention_mask"][row:row + 1], tasks=task)[task]
                assert torch.allclose(out[task][seen[task]], alone[0], atol=1e-5)
                seen[task] += 1
        used = [g is not None for g in grouped]
        # pfeiffer only: every ffn slot batches its groups; with a houlsby task (other inputs) the slots loop
        assert used and all(used) == ("t4" not in row_tasks) and any(used) == ("t4" not in row_tasks)
