"""MTLModel: task isolation, routing modes, states, and adapter files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mtl import model_files
from mtl.adapters.config import AdapterConfig
from mtl.errors import MTLConfigError
from mtl.adapters.inject import Target
from mtl.kinds import kind_of
from mtl.model import MTLModel
from mtl.part_pool import PartPool
from tests.conftest import tiny_backbone, tiny_batch


def _model(tasks=("a", "b", "c"), presets=("pfeiffer", "houlsby", "parallel"), family="bert") -> MTLModel:
    model = MTLModel(tiny_backbone(family))
    for i, (task, preset) in enumerate(zip(tasks, presets)):
        model.add_task(task, 3 + i, preset, labels=[f"l{j}" for j in range(3 + i)])
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _snapshot(params) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params}


def test_training_one_task_leaves_others_bit_identical():
    model = _model()
    model.set_trainable(["b"])
    before_a = _snapshot(model.task_parameters("a").items())
    before_c = _snapshot(model.task_parameters("c").items())
    before_b = _snapshot(model.task_parameters("b").items())
    backbone = _snapshot((k, v) for k, v in model.backbone.state_dict().items() if ".adapters." not in k)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch()
    model.train()
    for _ in range(3):
        logits = model(**batch, tasks="b")["b"]
        loss = kind_of(model.heads["b"].problem).loss(logits, torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, before in (("a", before_a), ("c", before_c)):
        for k, v in model.task_parameters(name).items():
            assert torch.equal(v, before[k]), f"{name}:{k} changed"
    assert any(not torch.equal(v, before_b[k]) for k, v in model.task_parameters("b").items())
    for k, v in model.backbone.state_dict().items():
        if ".adapters." not in k:
            assert torch.equal(v, backbone[k]), k
    digest = model.backbone_digest()
    with torch.no_grad():
        model.backbone.encoder.layer[1].output.base.dense.bias[0] += 1.0
    assert model.backbone_digest() != digest  # the digest sees a changed backbone weight
    assert all(not p.requires_grad for k, p in model.named_parameters() if ".adapters.b." not in k and "heads.b." not in k)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_all_tasks_in_one_forward_equals_separate_forwards(family):
    model = _model(family=family)
    batch = tiny_batch(rows=5)
    together = model(**batch, tasks=["a", "b", "c"])
    for task in ("a", "b", "c"):
        alone = model(**batch, tasks=task)[task]
        torch.testing.assert_close(together[task], alone, rtol=1e-5, atol=1e-5)


def test_replication_starts_at_first_adapter_layer():
    model = _model(tasks=("a", "b"), presets=("pfeiffer", "pfeiffer"))
    model.remove_task("b")
    model.add_task("b", 3, AdapterConfig(leave_out=[0]))
    assert model.first_adapter_layer([Target("b")]) == 1
    assert model.first_adapter_layer([Target("a"), Target("b")]) == 0
    seen = []
    hook = model.backbone.encoder.layer[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    batch = tiny_batch(rows=3)
    model.remove_task("a")
    model.add_task("a", 3, AdapterConfig(leave_out=[0]))
    model(**batch, tasks=["a", "b"])
    hook.remove()
    assert seen == [3]  # layer 0 ran once on the 3 original rows, not on 6 replicated ones


def test_row_tasks_equal_whole_batch_forwards():
    model = _model()
    batch = tiny_batch(rows=6)
    rows = ["c", "a", "c", "b", "a", "c"]
    mixed = model(**batch, row_tasks=rows)
    for task in ("a", "b", "c"):
        idx = [i for i, t in enumerate(rows) if t == task]
        alone = model(**batch, tasks=task)[task][idx]
        torch.testing.assert_close(mixed[task], alone, rtol=1e-5, atol=1e-5)


def test_unknown_task_is_an_error_not_a_fallback():
    model = _model()
    with pytest.raises(MTLConfigError, match="no adapter for task"):
        model(**tiny_batch(), tasks="nope")
    with pytest.raises(MTLConfigError, match="already exists"):
        model.add_task("a", 3)
    with pytest.raises(MTLConfigError, match="invalid"):
        model.add_task("has.dot", 3)


def test_frozen_task_cannot_be_trained_again():
    model = _model()
    model.freeze_task("a")
    assert all(not p.requires_grad for p in model.task_parameters("a").values())
    with pytest.raises(MTLConfigError, match="frozen"):
        model.set_trainable(["a", "b"])
    model.set_trainable(["b"])
    assert model.trainable_tasks() == ["b"]
    assert "frozen" in model.parameter_table()


def test_backbone_stays_in_eval_mode_while_training_unless_asked():
    model = _model()
    model.train()
    assert not model.backbone.encoder.layer[0].attention.self.training
    assert model.slots[0]["ffn"].adapters["a"].training and model.heads["a"].training
    model = MTLModel(tiny_backbone("bert"), backbone_dropout=True).train()
    assert model.backbone.encoder.layer[0].attention.self.training


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    batch = tiny_batch()
    for task in model.tasks:
        model_files.save_task(model, task, tmp_path / "adapters")
    files = load_file(str(tmp_path / "adapters" / "b" / "adapter.safetensors"))
    assert "adapters.0.attn.down.weight" in files and "head.out.bias" in files
    meta = json.loads((tmp_path / "adapters" / "b" / "adapter_config.json").read_text())
    assert meta["hidden_size"] == 64 and meta["num_layers"] == 2 and meta["adapter"]["type"] == "houlsby"
    assert meta["labels"] == ["l0", "l1", "l2", "l3"]
    fresh = MTLModel(tiny_backbone("bert"))
    for task in ("a", "b", "c"):
        model_files.load_task(fresh, tmp_path / "adapters" / task)
    for task in ("a", "b", "c"):
        assert torch.equal(fresh(**batch, tasks=task)[task], model(**batch, tasks=task)[task])
    assert not list((tmp_path / "adapters").glob(".*"))  # no temporary leftovers


def test_existing_adapter_is_never_overwritten_silently(tmp_path):
    model = _model()
    path = model_files.save_task(model, "a", tmp_path)
    original = (path / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(model.task_parameters("a").values())).add_(1.0)
    with pytest.raises(MTLConfigError, match="already exists"):
        model_files.save_task(model, "a", tmp_path)
    assert (path / "adapter.safetensors").read_bytes() == original
    model_files.save_task(model, "a", tmp_path, overwrite=True)
    assert (path / "adapter.safetensors").read_bytes() != original


def test_loading_into_a_different_backbone_shape_fails(tmp_path):
    model_files.save_task(_model(), "a", tmp_path)
    other = MTLModel(tiny_backbone("distilbert"))
    with pytest.raises(MTLConfigError, match="model_type"):
        model_files.load_task(other, tmp_path / "a")
    assert other.tasks == []


def test_from_pretrained_needs_exported_tasks(tmp_path):
    with pytest.raises(MTLConfigError, match="no exported tasks"):
        MTLModel.from_pretrained(tmp_path)


def test_shared_adapter_mode_one_adapter_many_heads(tmp_path):
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("a", 3, "pfeiffer", adapter_name="shared")
    model.add_task("b", 5, "pfeiffer", adapter_name="shared")
    assert model.task_parameters("a")["adapters.0.ffn.down.weight"] is model.task_parameters("b")["adapters.0.ffn.down.weight"]
    adapters = sum(p.numel() for k, p in model.backbone.named_parameters() if ".adapters." in k)
    assert adapters == 2 * (64 * 4 + 4 + 4 * 64 + 64)  # one adapter for two tasks
    with pytest.raises(MTLConfigError, match="another config"):
        model.add_task("c", 2, "houlsby", adapter_name="shared")
    with torch.no_grad():
        for p in model.task_parameters("a").values():
            p.add_(0.1)
    batch = tiny_batch()
    both = model(**batch, tasks=["a", "b"])
    for task in ("a", "b"):
        torch.testing.assert_close(both[task], model(**batch, tasks=task)[task], rtol=1e-5, atol=1e-5)
    for task in ("a", "b"):
        model_files.save_task(model, task, tmp_path)
    fresh = MTLModel(tiny_backbone("bert"))
    model_files.load_task(fresh, tmp_path / "a")
    model_files.load_task(fresh, tmp_path / "b")
    assert {t: fresh.target(t).name for t in fresh.tasks} == {"a": "shared", "b": "shared"}
    assert torch.equal(fresh(**batch, tasks="b")["b"], model(**batch, tasks="b")["b"])
    model.remove_task("a")  # the adapter stays while b uses it
    assert model.adapter_layers("b") == [0, 1]


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 1000])
def test_chunked_multi_task_forward_equals_separate_forwards(chunk_rows):
    model = _model()
    model.chunk_rows = chunk_rows
    batch = tiny_batch(rows=3)
    together = model(**batch, tasks=["a", "b", "c"])
    for task in ("a", "b", "c"):
        torch.testing.assert_close(together[task], model(**batch, tasks=task)[task], rtol=1e-5, atol=1e-5)
    assert [len(p) for p in model._packs(["a", "b", "c"], 3)] == {None: [3], 1: [1, 1, 1], 7: [2, 1],
                                                                  1000: [3]}[chunk_rows]


def test_library_layers_import_without_lightning():
    import subprocess
    import sys

    code = ("import sys, mtl, mtl.model, mtl.storage, mtl.atomic, mtl.fusion.report, mtl.prefix_cache, mtl.data.spec, mtl.data.sources; "
            "sys.exit(any(m.startswith('lightning') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name", ["half", "train", "cuda", "to"])
def test_a_task_named_like_a_module_method_is_one_line(name):
    model = MTLModel(tiny_backbone("bert"))
    with pytest.raises(MTLConfigError, match=f"task name '{name}' is reserved"):
        model.add_task(name, 2)
    assert model.tasks == [] and model.adapter_configs == {}
    model.add_task("halfway", 2)  # only exact attribute names are reserved


def test_a_pool_hands_removed_modules_to_a_load_of_the_same_shapes_and_the_answers_are_a_fresh_load(tmp_path):
    source = _model(tasks=("a", "b", "c", "d"), presets=("pfeiffer", "pfeiffer", "houlsby", "pfeiffer"))
    batch = tiny_batch()
    for task in source.tasks:
        model_files.save_task(source, task, tmp_path / "adapters")
    pool, served = PartPool(), MTLModel(tiny_backbone("bert"))
    model_files.load_task(served, tmp_path / "adapters" / "a", pool=pool)
    head, adapter = served.heads["a"], served.slots[0]["ffn"].adapters["a"]
    served.requires_grad_(False)
    served.remove_task("a", pool=pool)
    assert len(pool) == 2  # the head and the adapter's modules (one entry for all its slots)
    model_files.load_task(served, tmp_path / "adapters" / "c", pool=pool)  # houlsby, 5 outputs: nothing fits
    assert pool.reused == 0 and served.heads["c"] is not head
    served.remove_task("c", pool=pool)
    model_files.load_task(served, tmp_path / "adapters" / "d", pool=pool)  # pfeiffer, but 6 outputs: adapter only
    assert pool.reused == 1 and served.slots[0]["ffn"].adapters["d"] is adapter and served.heads["d"] is not head
    assert all(p.requires_grad for p in adapter.parameters())  # as built: trainable
    assert torch.equal(served(**batch, tasks="d")["d"], source(**batch, tasks="d")["d"])
    served.remove_task("d", pool=pool)
    model_files.load_task(served, tmp_path / "adapters" / "a", pool=pool)  # a's head and adapter back, refilled
    assert pool.reused == 3 and served.heads["a"] is head and served.slots[0]["ffn"].adapters["a"] is adapter
    assert torch.equal(served(**batch, tasks="a")["a"], source(**batch, tasks="a")["a"])
    assert len(pool) == 3  # c's head and adapter, d's head
    pool.trim(keep=1)
    assert len(pool) == 1
