"""Extractive QA through the workflows on a tiny backbone: adding a QA task to a trained system, save and reload,
AdapterDrop with the frozen-prefix cache, and fusion with a QA target or over a QA task's adapter."""

from __future__ import annotations

import torch

from mtl.lit import AdapterTrainer
from mtl.model import MTLModel
from tests.test_tagging_workflows import LossRecorder, _data, _files, _trainer


def test_a_qa_task_added_to_a_trained_system_leaves_it_untouched_and_reloads_exactly(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    first = AdapterTrainer(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run))
    _trainer(epochs=1).fit(first, datamodule=_data(tiny_dir, task_dir, tmp_path, ["keyword"]))
    before = _files(run / "adapters" / "keyword")
    second = AdapterTrainer(["qa"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                            load_from=str(run), eval_tasks=["keyword"], lr=1e-2)
    trainer = _trainer(epochs=1)
    data = _data(tiny_dir, task_dir, tmp_path, ["qa"], eval_tasks=["keyword"])
    trainer.fit(second, datamodule=data)
    assert {"val/keyword/acc", "val/qa/f1", "val/qa/exact"} <= set(trainer.callback_metrics)
    assert _files(run / "adapters" / "keyword") == before
    reloaded = MTLModel.from_pretrained(run, backbone=str(tiny_dir)).eval()
    assert reloaded.heads["qa"].problem == "extractive_qa" and reloaded.heads["qa"].num_outputs == 2
    second.model.eval()
    batch = next(iter(data.val_dataloader()[0]))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.equal(reloaded(*args, tasks="qa")["qa"], second.model(*args, tasks="qa")["qa"])
    saved = tmp_path / "saved"
    reloaded.save_pretrained(saved)
    again = MTLModel.from_pretrained(saved, backbone=str(tiny_dir)).eval()
    assert torch.equal(again(*args, tasks="qa")["qa"], second.model(*args, tasks="qa")["qa"])


def test_the_prefix_cache_with_adapterdrop_trains_a_qa_task_as_without_it(tiny_dir, task_dir, tmp_path):
    import lightning as L

    def run(folder, **kwargs):
        L.seed_everything(0)
        module = AdapterTrainer(["qa"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(folder),
                                export=False, lr=5e-3, head_dropout=0.0, adapter={"type": "pfeiffer", "drop_first": 1},
                                **kwargs)
        recorder = LossRecorder()
        trainer = _trainer(epochs=2, callbacks=[recorder])
        trainer.fit(module, datamodule=_data(tiny_dir, task_dir, folder, ["qa"]))
        return recorder.losses, trainer

    plain, _ = run(tmp_path / "plain")
    cached, trainer = run(tmp_path / "cached", cache_frozen_prefix=True)
    assert len(plain) == len(cached) > 10
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    assert trainer.callback_metrics["cache/hit_rate"] == 1.0


def test_fusion_with_a_qa_target_and_a_classifier_fused_over_a_qa_adapter(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    for task in ("keyword", "qa"):
        module = AdapterTrainer([task], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                                load_from=str(run) if task == "qa" else None, lr=1e-2)
        _trainer(epochs=1).fit(module, datamodule=_data(tiny_dir, task_dir, tmp_path, [task]))
    before = _files(run / "adapters")
    for target, name in (("qa", "qa_fusion"), ("keyword", "key_fusion")):
        fusion = {"name": name, "adapters": ["keyword", "qa"], "config": {"type": "dynamic"}}
        module = AdapterTrainer([target], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                                load_from=str(run), fusion=fusion, lr=5e-3)
        trainer = _trainer(epochs=1)
        data = _data(tiny_dir, task_dir, tmp_path, [target])
        trainer.fit(module, datamodule=data)
        assert f"val/{name}/{'f1' if target == 'qa' else 'acc'}" in trainer.callback_metrics
        assert module.model.heads[name].problem == module.model.heads[target].problem
        reloaded = MTLModel.from_pretrained(run, backbone=str(tiny_dir)).eval()
        module.model.eval()
        batch = next(iter(data.val_dataloader()[0]))
        args = (batch["input_ids"], batch["attention_mask"])
        assert torch.equal(reloaded(*args, tasks=name)[name], module.model(*args, tasks=name)[name])
    assert _files(run / "adapters") == before


def test_a_qa_task_in_a_continual_sequence_scores_its_f1_in_r_and_keeps_its_adapter(tiny_dir, task_dir, tmp_path):
    import contextlib
    import io
    import json

    from mtl.cli import main

    (tmp_path / "c.yaml").write_text(f"""
seed_everything: 0
continual: {{order: [qa, keyword], strategy: per_task, run_dir: {tmp_path / 'run'}, tasks_dir: {task_dir}, routers: []}}
model: {{backbone: {tiny_dir}, lr: 1.0e-2}}
data: {{batch_size: 16, cache_dir: {tmp_path / 'cache'}}}
trainer: {{max_epochs: 2, logger: false, enable_checkpointing: false, enable_progress_bar: false,
          enable_model_summary: false, limit_val_batches: 0}}
""")
    with contextlib.redirect_stdout(io.StringIO()):
        main(["continual", "--config", str(tmp_path / "c.yaml")])
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["task_metrics"]["qa"] == {"problem": "extractive_qa", "headline": "f1",
                                         "names": {"score": "SQuAD F1", "f1": "SQuAD F1"}}
    scores = out["scores"]
    after = scores["score"]["after"]
    assert after[0][0] == scores["f1"]["after"][0][0] and scores["acc"]["after"][0][0] is None  # QA has no acc
    assert after[1][0] == after[0][0]  # per_task: training keyword left the QA adapter as it was
    steps = tmp_path / "run" / "steps"
    assert _files(steps / "01-qa" / "adapters" / "qa") == _files(steps / "02-keyword" / "adapters" / "qa")
    assert "| stage | qa (SQuAD F1) | keyword (accuracy) |" in (tmp_path / "run" / "results.md").read_text()
