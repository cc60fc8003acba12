"""Frozen-prefix cache: same training as without it, reuse across epochs and runs, invalidation, refusals."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import BertConfig, BertModel

from mtl.backbone import load_tokenizer
from mtl.data.module import TaskDataModule
from mtl.errors import MTLConfigError
from mtl.lit import AdapterTrainer
from mtl.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A tiny 4-layer BERT with the MiniLM tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert-4")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(path)
    load_tokenizer("minilm-l6").save_pretrained(path)
    return path


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _run(deep_dir, task_dir, tmp_path, epochs=2, **kwargs):
    L.seed_everything(0)
    module = AdapterTrainer(["keyword"], backbone=str(deep_dir), tasks_dir=str(task_dir),
                            run_dir=str(tmp_path / "run"), export=False, lr=5e-3,
                            adapter={"type": "pfeiffer", "drop_first": 2}, **kwargs)
    data = TaskDataModule(["keyword"], backbone=str(deep_dir), tasks_dir=str(task_dir), batch_size=16,
                          cache_dir=str(tmp_path / "data-cache"))
    recorder = LossRecorder()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return module, recorder.losses, trainer


def test_cached_training_has_the_same_loss_curve(deep_dir, task_dir, tmp_path):
    _, plain, _ = _run(deep_dir, task_dir, tmp_path / "plain")
    module, cached, trainer = _run(deep_dir, task_dir, tmp_path / "cached", cache_frozen_prefix=True)
    assert len(plain) == len(cached) > 10
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    assert trainer.callback_metrics["cache/hit_rate"] == 1.0  # the second epoch reads everything from the cache
    assert module.prefix_cache.k == 2


def test_disk_spill_is_reused_by_a_later_run_and_invalidated_by_a_new_key(tmp_path):
    torch.manual_seed(0)
    states = {i: torch.randn(3 + i % 4, 8) for i in range(6)}
    calls = []

    def compute_for(rows):
        def compute(select):
            calls.append(len(select))
            out = torch.zeros(len(select), 6, 8)
            for j, s in enumerate(select.tolist()):
                out[j, :states[rows[s]].shape[0]] = states[rows[s]]
            return out
        return compute

    def mask_for(rows):
        mask = torch.zeros(len(rows), 6, dtype=torch.long)
        for j, r in enumerate(rows):
            mask[j, :states[r].shape[0]] = 1
        return mask

    def fill(cache):
        for rows in ([0, 1, 2], [3, 4, 5]):
            got = cache.fetch(("t", "train"), rows, mask_for(rows), compute_for(rows))
            for j, r in enumerate(rows):
                assert torch.equal(got[j, :states[r].shape[0]], states[r])

    first = PrefixCache(2, "key-a", {("t", "train"): 6}, 8, memory_mb=0, directory=tmp_path)
    fill(first)
    assert calls == [3, 3] and first.used == 0  # nothing fit in memory: all on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefix-key-a-t-train.bin", "prefix-key-a-t-train.json"]
    again = PrefixCache(2, "key-a", {("t", "train"): 6}, 8, memory_mb=0, directory=tmp_path)
    fill(again)
    assert calls == [3, 3] and again.hits == 6  # read back from the memory-mapped file
    other = PrefixCache(3, "key-b", {("t", "train"): 6}, 8, memory_mb=0, directory=tmp_path)
    fill(other)
    assert calls == [3, 3, 3, 3]  # a new key (e.g. another depth or dataset) recomputes


def test_fusion_training_is_cached_too_with_the_same_loss_curve(deep_dir, task_dir, tmp_path):
    """A fusion over adapters that skip the first 2 layers has no trainable part there: the cache holds them."""
    for task in ("keyword", "colour"):
        L.seed_everything(0)
        module = AdapterTrainer([task], backbone=str(deep_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path / "run"),
                                adapter={"type": "pfeiffer", "drop_first": 2})
        data = TaskDataModule([task], backbone=str(deep_dir), tasks_dir=str(task_dir), batch_size=16,
                              cache_dir=str(tmp_path / "data-cache"))
        L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0).fit(module, datamodule=data)
    # head dropout off: with it the cached and the uncached fusion runs draw different masks; this compares arithmetic
    fusion = {"name": "keyword_fusion", "adapters": ["colour", "keyword"]}
    runs = {}
    for cached in (False, True):
        module, losses, trainer = _run(deep_dir, task_dir, tmp_path / f"fusion-{cached}", load_from=str(tmp_path / "run"),
                                       fusion=fusion, cache_frozen_prefix=cached, head_dropout=0.0)
        runs[cached] = losses
    assert len(runs[False]) == len(runs[True]) > 10
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-4, atol=1e-5)
    assert module.prefix_cache.k == 2 and trainer.callback_metrics["cache/hit_rate"] == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapter={"type": "pfeiffer", "drop_first": 2, "robust_drop": True}), "robust_drop"),
    (dict(adapter={"type": "pfeiffer"}), "drop_first >= 1"),
    (dict(adapter={"type": "pfeiffer", "drop_first": 2}, backbone_dropout=True), "backbone_dropout"),
])
def test_cache_is_refused_where_it_cannot_be_exact(deep_dir, task_dir, tmp_path, kwargs, message):
    module = AdapterTrainer(["keyword"], backbone=str(deep_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path),
                            export=False, cache_frozen_prefix=True, **kwargs)
    data = TaskDataModule(["keyword"], backbone=str(deep_dir), tasks_dir=str(task_dir),
                          cache_dir=str(tmp_path / "data-cache"))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(MTLConfigError, match=message):
        trainer.fit(module, datamodule=data)


def test_cache_key_changes_with_depth_and_data(deep_dir, task_dir, tmp_path):
    def key(k, tasks_dir):
        module = AdapterTrainer(["keyword"], backbone=str(deep_dir), tasks_dir=str(tasks_dir), run_dir=str(tmp_path),
                                export=False, cache_frozen_prefix=True, adapter={"type": "pfeiffer", "drop_first": k})
        data = TaskDataModule(["keyword"], backbone=str(deep_dir), tasks_dir=str(tasks_dir),
                              cache_dir=str(tmp_path / "data-cache"))
        data.setup("fit")
        module.trainer = L.Trainer(logger=False)
        module.trainer.datamodule = data
        module.setup("fit")
        return module.prefix_cache.key

    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "keyword.yaml").write_text((task_dir / "keyword.yaml").read_text())
    (changed / "keyword.csv").write_text((task_dir / "keyword.csv").read_text() + "alpha good beta gamma 999,good\n")
    assert key(2, task_dir) == key(2, task_dir)
    assert len({key(2, task_dir), key(3, task_dir), key(2, changed)}) == 3


def test_cache_is_refused_with_a_trainable_parameter_in_the_cached_layers(deep_dir, task_dir, tmp_path):
    module = AdapterTrainer(["keyword"], backbone=str(deep_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path),
                            export=False, cache_frozen_prefix=True, adapter={"type": "pfeiffer", "drop_first": 2})
    module.model.backbone.encoder.layer[1].intermediate.dense.weight.requires_grad_(True)
    data = TaskDataModule(["keyword"], backbone=str(deep_dir), tasks_dir=str(task_dir),
                          cache_dir=str(tmp_path / "data-cache"))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(MTLConfigError, match=r"intermediate.dense.weight \(layer 1\)"):
        trainer.fit(module, datamodule=data)
