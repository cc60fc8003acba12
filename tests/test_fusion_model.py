"""AdapterFusion inside MTLModel: the routed forward, sharing with the fused adapters' own tasks, states, files."""

from __future__ import annotations

import pytest
import torch

from mtl import model_files
from mtl.adapters.bottleneck import BottleneckAdapter
from mtl.adapters.inject import Routing, Target
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from tests.conftest import tiny_backbone, tiny_batch


def _randomise(model: MTLModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in model.states:
            for p in model.part_parameters(part).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _fused_model(family: str = "bert", preset: str = "pfeiffer", names=("a", "b", "c")) -> MTLModel:
    model = MTLModel(tiny_backbone(family))
    for name in names:
        model.add_task(name, 3, preset)
    model.add_fusion("fz", list(names), 2)
    _randomise(model)
    return model.eval()


@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby"])
def test_fusion_slot_matches_the_paper_formula_written_here(preset):
    model = _fused_model(preset=preset)
    slot = model.slots[1]["ffn"]
    h_in, x = torch.randn(2, 5, 128), torch.randn(2, 5, 64)
    routing = Routing([(Target("fz", ("a", "b", "c")), slice(None))])
    with model.context.use(routing):
        got = slot(h_in, x)
    h = slot.base.dense(h_in)
    ln, fusion = slot.base.LayerNorm, slot.fusions["fz"]
    z = ln(h + x) if preset == "pfeiffer" else h  # Pfeiffer reads LN(h + x), Houlsby reads h; both add h back
    ups = [slot.adapters[n].up(slot.adapters[n].act(slot.adapters[n].down(z))) for n in ("a", "b", "c")]
    q = fusion.query(z)
    scores = torch.stack([(q * fusion.key(u)).sum(-1) for u in ups], dim=-1)
    p = scores.softmax(-1)
    context = sum(p[..., i:i + 1] * fusion.value(u) for i, u in enumerate(ups))
    torch.testing.assert_close(got, ln(context + h + x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby"])
def test_fast_and_naive_paths_agree_and_one_pass_equals_separate_forwards(family, preset):
    model = _fused_model(family, preset)
    batch = tiny_batch()
    fast = model(**batch, tasks="fz")["fz"]
    together = model(**batch, tasks=["a", "fz", "b"])
    for task in ("a", "fz", "b"):
        torch.testing.assert_close(together[task], model(**batch, tasks=task)[task], rtol=1e-5, atol=1e-5)
    model.fast_fusion = False
    torch.testing.assert_close(model(**batch, tasks="fz")["fz"], fast, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, model.heads["fz"](model.encode(batch["input_ids"], batch["attention_mask"], None,
                                                                    []), batch["attention_mask"]), atol=1e-4)


def test_fused_target_and_its_adapters_in_one_forward_share_the_adapters_first_layer(monkeypatch):
    model = _fused_model()
    batch = tiny_batch(rows=3)
    separate = {t: model(**batch, tasks=t)[t] for t in ("fz", "a", "b", "c")}
    calls: dict[int, int] = {}
    original = BottleneckAdapter.up_output

    def counting(self, z):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, z)

    monkeypatch.setattr(BottleneckAdapter, "up_output", counting)
    together = model(**batch, tasks=["fz", "a", "b", "c"])
    for task, logits in separate.items():
        torch.testing.assert_close(together[task], logits, rtol=1e-5, atol=1e-5)
    first = model.slots[0]["ffn"]
    # in the slot that makes the copies every route starts from the same rows: each adapter runs once there
    assert [calls[id(first.adapters[n])] for n in "abc"] == [1, 1, 1]
    # above it the fused rows take the factored path (no per-adapter output of width d), own rows call up_output
    assert [calls[id(model.slots[1]["ffn"].adapters[n])] for n in "abc"] == [1, 1, 1]
    calls.clear()
    model.fast_fusion = False  # the unfactored path builds every adapter's output for the fused rows as well
    model(**batch, tasks=["fz", "a", "b", "c"])
    assert [calls[id(first.adapters[n])] for n in "abc"] == [1, 1, 1]
    assert [calls[id(model.slots[1]["ffn"].adapters[n])] for n in "abc"] == [2, 2, 2]


def test_row_tasks_mix_a_fusion_and_plain_tasks():
    model = _fused_model()
    batch = tiny_batch(rows=4)
    got = model(**batch, row_tasks=["a", "fz", "a", "fz"])
    rows = torch.tensor([1, 3])
    alone = model(batch["input_ids"][rows], batch["attention_mask"][rows], tasks="fz")["fz"]
    torch.testing.assert_close(got["fz"], alone, rtol=1e-5, atol=1e-5)


def test_fusion_of_copies_of_one_adapter_with_identity_value_is_that_adapter():
    model = _fused_model()
    with torch.no_grad():
        a = model.part_parameters(("adapter", "a"))
        for other in ("b", "c"):  # whatever the weights p, the mix of identical outputs is that output
            for k, p in model.part_parameters(("adapter", other)).items():
                p.copy_(a[k])
        for slot in model.iter_slots():
            if "fz" in slot.fusions:
                slot.fusions["fz"].value.weight.copy_(torch.eye(64))
    batch = tiny_batch()
    hidden_fz = model.encode(batch["input_ids"], batch["attention_mask"], None, [(model.target("fz"), slice(None))])
    hidden_a = model.encode(batch["input_ids"], batch["attention_mask"], None, [(model.target("a"), slice(None))])
    torch.testing.assert_close(hidden_fz, hidden_a, rtol=1e-5, atol=1e-5)
    bare = model.encode(batch["input_ids"], batch["attention_mask"], None, [])
    assert not torch.allclose(hidden_a, bare, atol=1e-3)  # the adapter really acts


def test_permuting_the_fused_adapters_changes_nothing():
    model = _fused_model()
    batch = tiny_batch()
    ref = model.encode(batch["input_ids"], batch["attention_mask"], None, [(model.target("fz"), slice(None))])
    got = model.encode(batch["input_ids"], batch["attention_mask"], None, [(Target("fz", ("c", "a", "b")), slice(None))])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fusion_parameter_count_and_states():
    model = _fused_model()
    fusion = sum(p.numel() for p in model.part_parameters(("fusion", "fz")).values())
    assert fusion == 2 * (2 * (64 * 64 + 64) + 64 * 64)  # Pfeiffer: one FFN location per layer, Q, K with bias, V without
    model.freeze_task("a")
    model.freeze_task("b")
    model.freeze_task("c")
    model.set_trainable(["fz"])
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions.fz." in k or k.startswith("heads.fz.") for k in trainable)
    assert model.trainable_tasks() == ["fz"]
    with pytest.raises(MTLConfigError, match="frozen for good"):
        model.set_trainable(["fz"], parts=[("adapter", "a")])
    table = model.parameter_table()
    assert "fusion" in table and "fz" in table


def test_temperature_anneals_over_steps_and_is_final_in_evaluation():
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("a", 2)
    model.add_task("b", 2)
    model.add_fusion("fz", ["a", "b"], 2, {"temperature": True, "temperature_start": 10.0, "temperature_end": 2.0,
                                           "temperature_steps": 4})
    model.train()
    assert [model.fusion_temperatures(s)["fz"] for s in (0, 2, 4, 9)] == [10.0, 6.0, 2.0, 2.0]
    before = model.fusion_temperatures(0)
    model(**tiny_batch(), tasks="fz", fusion_step=0)
    assert model.fusion_temperatures(0) == before  # a forward never moves it
    model.eval()
    assert model.fusion_temperatures(0)["fz"] == 2.0


def test_value_regularization_counts_only_trainable_regularised_fusions():
    model = _fused_model()
    model.freeze_task("fz")
    assert model.value_regularization().item() == 0.0
    other = _fused_model()
    other.set_trainable(["fz"])
    expected = sum(0.01 * (torch.eye(64) - s.fusions["fz"].value.weight).pow(2).sum()
                   for s in other.iter_slots() if "fz" in s.fusions)
    torch.testing.assert_close(other.value_regularization(), expected)


@pytest.mark.parametrize("adapters, config, message", [
    (["a"], "dynamic", "at least two distinct"),
    (["a", "a"], "dynamic", "at least two distinct"),
    (["a", "nope"], "dynamic", r"unknown adapter\(s\) \['nope'\]"),
    (["a", "h"], "dynamic", "different locations"),
    (["a", "p"], "dynamic", "must be sequential"),
    (["a", "b"], {"type": "dynamic", "colour": 1}, "unknown fusion keys"),
])
def test_bad_fusions_fail_with_one_line(adapters, config, message):
    model = MTLModel(tiny_backbone("bert"))
    for name, preset in (("a", "pfeiffer"), ("b", "pfeiffer"), ("h", "houlsby"), ("p", "parallel")):
        model.add_task(name, 2, preset)
    with pytest.raises(MTLConfigError, match=message) as err:
        model.add_fusion("fz", adapters, 2, config)
    assert "\n" not in str(err.value)
    assert "fz" not in model.tasks and all("fz" not in s.fusions for s in model.iter_slots())


def test_fusion_files_round_trip_and_guard_their_adapters(tmp_path):
    model = _fused_model()
    for task in ("a", "b", "c"):
        model_files.save_task(model, task, tmp_path / "adapters")
    path = model_files.save_fusion(model, "fz", tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["fusion.safetensors", "fusion_config.json"]
    with pytest.raises(MTLConfigError, match="already exists"):
        model_files.save_fusion(model, "fz", tmp_path)
    fresh = MTLModel.from_pretrained(tmp_path, backbone=tiny_backbone("bert")).eval()
    batch = tiny_batch()
    assert torch.equal(fresh(**batch, tasks="fz")["fz"], model(**batch, tasks="fz")["fz"])
    assert fresh.target("fz") == Target("fz", ("a", "b", "c"))

    weights = tmp_path / "adapters" / "b" / "adapter.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(MTLConfigError, match="'b' changed since the fusion was trained"):
        MTLModel.from_pretrained(tmp_path, backbone=tiny_backbone("bert"))
    weights.write_bytes(original)
    (tmp_path / "adapters" / "b").rename(tmp_path / "b-elsewhere")
    with pytest.raises(MTLConfigError, match="'b' is missing"):
        MTLModel.from_pretrained(tmp_path, backbone=tiny_backbone("bert"))
    (tmp_path / "b-elsewhere").rename(tmp_path / "adapters" / "b")
    with pytest.raises(MTLConfigError, match="model_type"):
        MTLModel.from_pretrained(tmp_path, backbone=tiny_backbone("distilbert"))


def test_an_inactive_task_refuses_rows_but_can_still_be_saved_and_removed(tmp_path):
    model = _fused_model()
    model.set_active(("adapter", "a"), False)
    with pytest.raises(MTLConfigError, match="inactive"):
        model(**tiny_batch(), tasks="a")
    assert model_files.save_task(model, "a", tmp_path).is_dir()
    model.remove_task("fz")
    model.remove_task("a")
    assert model.tasks == ["b", "c"] and ("adapter", "a") not in model.states
