"""Multi-task workflows on a tiny local backbone: joint training, adding a task, predicting with many."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from mtl import model_files
from mtl.backbone import load_tokenizer
from mtl.data.module import TaskDataModule
from mtl.errors import MTLConfigError
from mtl.lit import AdapterTrainer
from mtl.model import MTLModel
from mtl.predict import PredictionWriter
from tests.conftest import export_random_tasks


def _trainer(epochs: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, **kwargs)


def _data(tiny_dir, task_dir, tmp_path, tasks, **kwargs) -> TaskDataModule:
    return TaskDataModule(tasks, backbone=str(tiny_dir), tasks_dir=str(task_dir), batch_size=16,
                          cache_dir=str(tmp_path / "cache"), **kwargs)


def test_joint_training_logs_every_task_and_the_average(tiny_dir, task_dir, tmp_path):
    module = AdapterTrainer(["keyword", "colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir),
                            run_dir=str(tmp_path / "run"), lr=5e-3)
    trainer = _trainer(epochs=3)
    trainer.fit(module, datamodule=_data(tiny_dir, task_dir, tmp_path, ["keyword", "colour"]))
    metrics = trainer.callback_metrics
    for key in ("val/keyword/acc", "val/colour/acc", "val/avg/acc", "val/avg/f1"):
        assert key in metrics
    assert not any("dataloader_idx" in key for key in metrics)
    avg = (metrics["val/keyword/acc"] + metrics["val/colour/acc"]) / 2
    assert torch.isclose(metrics["val/avg/acc"], avg)
    assert sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir()) == ["colour", "keyword"]


def test_shared_adapter_mode_trains_one_adapter_for_all_tasks(tiny_dir, task_dir, tmp_path):
    module = AdapterTrainer(["keyword", "colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir),
                            run_dir=str(tmp_path / "run"), adapter_sharing="shared", export=False)
    assert {t: module.model.target(t).name for t in module.model.tasks} == {"keyword": "shared", "colour": "shared"}
    adapter_params = [n for n, p in module.named_parameters() if p.requires_grad and ".adapters." in n]
    assert adapter_params and all(".adapters.shared." in n for n in adapter_params)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_add_a_task_to_a_trained_system(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    first = AdapterTrainer(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run))
    _trainer(epochs=1).fit(first, datamodule=_data(tiny_dir, task_dir, tmp_path, ["keyword"]))
    before_files = _files(run / "adapters" / "keyword")
    data = _data(tiny_dir, task_dir, tmp_path, ["keyword"])
    data.setup("validate")
    batch = next(iter(data.val_dataloader()[0]))
    before = MTLModel.from_pretrained(run, backbone=str(tiny_dir))(
        batch["input_ids"], batch["attention_mask"], tasks="keyword")["keyword"]

    second = AdapterTrainer(["colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                            load_from=str(run), eval_tasks=["keyword"])
    assert second.model.trainable_tasks() == ["colour"] and second.model.is_frozen("keyword")
    trainer = _trainer(epochs=1)
    trainer.fit(second, datamodule=_data(tiny_dir, task_dir, tmp_path, ["colour"], eval_tasks=["keyword"]))
    assert "val/keyword/acc" in trainer.callback_metrics and "val/colour/acc" in trainer.callback_metrics
    assert _files(run / "adapters" / "keyword") == before_files
    after = MTLModel.from_pretrained(run, backbone=str(tiny_dir))
    assert sorted(after.tasks) == ["colour", "keyword"]
    got = after(batch["input_ids"], batch["attention_mask"], tasks="keyword")["keyword"]
    assert torch.equal(got, before)


def test_add_task_wrong_combinations_fail_in_one_line(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    model = MTLModel(str(tiny_dir))
    model.add_task("keyword", 2, labels=["bad", "good"])
    model_files.save_task(model, "keyword", run / "adapters")
    kwargs = dict(backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), load_from=str(run))
    with pytest.raises(MTLConfigError, match="already trained"):
        AdapterTrainer(["keyword"], **kwargs)
    assert AdapterTrainer(["keyword"], overwrite=True, **kwargs).model.trainable_tasks() == ["keyword"]
    with pytest.raises(MTLConfigError, match="exported for backbone"):
        AdapterTrainer(["colour"], **{**kwargs, "backbone": "minilm-l6"})
    bad = tmp_path / "bad_tasks"
    bad.mkdir()
    (bad / "keyword.yaml").write_text((task_dir / "keyword.yaml").read_text().replace(
        "labels: [bad, good]", "labels: [bad, good, meh]").replace("keyword.csv", str(task_dir / "keyword.csv")))
    with pytest.raises(MTLConfigError, match="3 labels, but the adapter"):
        AdapterTrainer([], **{**kwargs, "tasks_dir": str(bad)}, eval_tasks=["keyword"])
    with pytest.raises(MTLConfigError, match="no trained adapter"):
        AdapterTrainer([], **kwargs, eval_tasks=["colour"])


def test_predict_file_with_every_task_in_one_forward(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    model = export_random_tasks(tiny_dir, run)
    texts = tmp_path / "in.txt"
    texts.write_text("alpha good river\n\nred stone cloud\nbeta bad\n")
    module = AdapterTrainer([], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), load_from=str(run))
    out = tmp_path / "pred.jsonl"
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))])
    trainer.predict(module, datamodule=_data(tiny_dir, task_dir, tmp_path, [], predict_file=str(texts)),
                    return_predictions=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * 2
    assert {(r["task"], r["index"]) for r in rows} == {(t, i) for t in ("keyword", "colour") for i in range(3)}
    reference = MTLModel.from_pretrained(run, backbone=str(tiny_dir)).eval()
    enc = load_tokenizer(str(tiny_dir))(["alpha good river"], return_tensors="pt")
    for task in ("keyword", "colour"):
        probs = reference(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], tasks=task)[task].softmax(-1)
        row = next(r for r in rows if r["task"] == task and r["index"] == 0)
        assert row["text"] == "alpha good river"
        assert row["label"] == reference.records[task].labels[int(probs.argmax())]
        assert abs(row["score"] - probs.max().item()) < 1e-5
    with pytest.raises(MTLConfigError, match="already exists"):
        L.Trainer(logger=False, callbacks=[PredictionWriter(str(out))]).predict(
            module, datamodule=_data(tiny_dir, task_dir, tmp_path, [], predict_file=str(texts)))


def test_prediction_rows_as_csv(tmp_path):
    from mtl.predict import write_rows

    out = tmp_path / "p.csv"
    write_rows(out, [{"task": "a", "index": 0, "label": "x", "score": 0.5, "text": "hi, there"}])
    assert out.read_text().splitlines() == ["task,index,label,score,text", 'a,0,x,0.5,"hi, there"']
    with pytest.raises(MTLConfigError, match=".jsonl or .csv"):
        PredictionWriter(str(tmp_path / "p.txt"))


def _stage_one(tiny_dir, task_dir, tmp_path) -> Path:
    run = tmp_path / "run"
    first = AdapterTrainer(["keyword", "colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                           lr=5e-3)
    _trainer(epochs=1).fit(first, datamodule=_data(tiny_dir, task_dir, tmp_path, ["keyword", "colour"]))
    return run


def test_fusion_stage_trains_only_the_fusion_and_head_and_reloads_exactly(tiny_dir, task_dir, tmp_path, capsys):
    run = _stage_one(tiny_dir, task_dir, tmp_path)
    before = _files(run / "adapters")
    fusion = {"name": "colour_fusion", "adapters": ["keyword", "colour"], "config": {"type": "dynamic"}}
    module = AdapterTrainer(["colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                            load_from=str(run), fusion=fusion, lr=5e-3)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".fusions.colour_fusion." in n or n.startswith("model.heads.colour_fusion.")
                             for n in trainable)
    data = _data(tiny_dir, task_dir, tmp_path, ["colour"])
    trainer = _trainer(epochs=2)
    trainer.fit(module, datamodule=data)
    assert "val/colour_fusion/acc" in trainer.callback_metrics and "train/fusion_reg" in trainer.logged_metrics
    assert _files(run / "adapters") == before  # every fused adapter's files are byte-identical
    folder = run / "fusions" / "colour_fusion"
    assert sorted(p.name for p in folder.iterdir()) == ["attention.json", "attention.png", "fusion.safetensors",
                                                        "fusion_config.json"]
    report = json.loads((folder / "attention.json").read_text())
    assert report["adapters"] == ["keyword", "colour"] and len(report["means"]) == 2  # one FFN slot per layer
    assert all(abs(sum(row) - 1.0) < 1e-5 for row in report["means"].values())
    assert "mean attention per layer and adapter" in capsys.readouterr().out
    assert (folder / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    reloaded = MTLModel.from_pretrained(run, backbone=str(tiny_dir)).eval()
    module.model.eval()
    data.setup("validate")
    for batch in data.val_dataloader()[0]:
        args = (batch["input_ids"], batch["attention_mask"])
        assert torch.equal(reloaded(*args, tasks="colour_fusion")["colour_fusion"],
                           module.model(*args, tasks="colour_fusion")["colour_fusion"])

    with pytest.raises(MTLConfigError, match="'colour_fusion' already exists"):
        AdapterTrainer(["colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                       load_from=str(run), fusion=fusion)


@pytest.mark.parametrize("change, message", [
    (dict(tasks=["colour", "keyword"]), "exactly one target task"),
    (dict(load_from=None), "needs model.load_from"),
    (dict(fusion={"name": "f", "adapters": ["keyword"]}), "at least two distinct adapters"),
    (dict(fusion={"name": "f", "adapters": ["keyword", "nope"]}), r"unknown adapter\(s\) \['nope'\]"),
    (dict(fusion={"name": "f", "adapters": ["keyword", "colour"], "unfreeze_adapters": True}), "overwrite: true"),
    (dict(fusion={"name": "f", "adapters": ["keyword", "colour"], "config": {"type": "lora"}}), "fusion.type"),
])
def test_bad_fusion_stage_settings_fail_before_training(tiny_dir, task_dir, tmp_path, change, message):
    run = _stage_one(tiny_dir, task_dir, tmp_path)
    kwargs = dict(tasks=["colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                  load_from=str(run), fusion={"name": "f", "adapters": ["keyword", "colour"]})
    kwargs.update(change)
    with pytest.raises(MTLConfigError, match=message):
        AdapterTrainer(**kwargs)
    assert not (run / "fusions").exists()


def test_overwriting_an_adapter_a_fusion_fuses_is_refused_before_training(tiny_dir, task_dir, tmp_path):
    import shutil

    run = _stage_one(tiny_dir, task_dir, tmp_path)
    fusion = {"name": "colour_fusion", "adapters": ["keyword", "colour"], "config": {"type": "dynamic"}}
    _trainer(epochs=1).fit(AdapterTrainer(["colour"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                                          load_from=str(run), fusion=fusion),
                           datamodule=_data(tiny_dir, task_dir, tmp_path, ["colour"]))
    common = dict(backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), overwrite=True)
    module = AdapterTrainer(["keyword"], **common)  # a fresh keyword exported over the fused one
    with pytest.raises(MTLConfigError) as err:
        module.check_before("fit")
    message = str(err.value)
    assert message.startswith(f"{run / 'adapters' / 'keyword'}: fused by fusion(s) ['colour_fusion'] in the same "
                              "run folder") and "\n" not in message
    assert "train into a new run folder" in message and f"remove the fusion(s) first ({run / 'fusions'}" in message
    with pytest.raises(MTLConfigError, match="frozen for good"):  # loaded with its fusion: refused when built
        AdapterTrainer(["keyword"], load_from=str(run), **common)
    # a task no fusion fuses can still be replaced
    (run / "fusions" / "colour_fusion" / "fusion_config.json").write_text(
        (run / "fusions" / "colour_fusion" / "fusion_config.json").read_text().replace("adapters/keyword/", "adapters/x/"))
    AdapterTrainer(["keyword"], **common).check_before("fit")
    (run / "fusions" / "colour_fusion" / "fusion_config.json").write_text(
        (run / "fusions" / "colour_fusion" / "fusion_config.json").read_text().replace("adapters/x/", "adapters/keyword/"))
    # the fusion trained again with its adapters rewrites its own record; another fusion over them would break
    again = dict(fusion={**fusion, "unfreeze_adapters": True}, load_from=str(run), **common)
    AdapterTrainer(["colour"], **again).check_before("fit")
    shutil.copytree(run / "fusions" / "colour_fusion", run / "fusions" / "other")
    config = run / "fusions" / "other" / "fusion_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "fusion": "other"}))
    with pytest.raises(MTLConfigError, match=r"adapters/(keyword|colour): fused by fusion\(s\) \['other'\]"):
        AdapterTrainer(["colour"], **again).check_before("fit")
