"""Lightning training end to end on a tiny local backbone and generated data (seconds)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from mtl.cli import main
from mtl.data.module import TaskDataModule
from mtl.errors import MTLConfigError
from mtl.lit import AdapterTrainer
from mtl.model import MTLModel

def _fit(tiny_dir, task_dir, run_dir, tmp_path, epochs=3, **model_kwargs):
    model = AdapterTrainer(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run_dir),
                           lr=5e-3, **model_kwargs)
    data = TaskDataModule(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), batch_size=16,
                          cache_dir=str(tmp_path / "cache"))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir / "ckpt", monitor="val/avg/acc", mode="max",
                                               save_last=True)
    trainer = L.Trainer(max_epochs=epochs, logger=False, callbacks=[ckpt], enable_progress_bar=False,
                        default_root_dir=run_dir, enable_model_summary=False)
    return model, data, trainer


def test_fit_trains_exports_and_never_touches_the_backbone(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    model, data, trainer = _fit(tiny_dir, task_dir, run, tmp_path)
    before = model.model.backbone_digest()
    trainer.fit(model, datamodule=data)
    assert model.model.backbone_digest() == before
    assert trainer.callback_metrics["val/keyword/acc"] > 0.8  # the keyword is learnable
    exported = MTLModel.from_pretrained(run, backbone=str(tiny_dir))
    assert exported.tasks == ["keyword"]
    batch = next(iter(data.val_dataloader()[0]))
    model.model.eval()
    with torch.no_grad():
        want = model.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], tasks="keyword")
        got = exported(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], tasks="keyword")
    assert torch.equal(want["keyword"], got["keyword"])  # the export is the best checkpoint, restored


def test_checkpoint_holds_only_trainable_tensors_and_resumes(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    model, data, trainer = _fit(tiny_dir, task_dir, run, tmp_path, epochs=1, export=False)
    trainer.fit(model, datamodule=data)
    last = run / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    # resume strictly into a fresh module and continue for one more epoch
    model2, data2, trainer2 = _fit(tiny_dir, task_dir, run, tmp_path, epochs=2, export=False)
    trainer2.fit(model2, datamodule=data2, ckpt_path=str(last))
    assert trainer2.current_epoch == 2 and trainer2.global_step == 2 * trainer.global_step


def test_fit_refuses_to_overwrite_an_exported_adapter(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    model, data, trainer = _fit(tiny_dir, task_dir, run, tmp_path, epochs=1)
    trainer.fit(model, datamodule=data)
    saved = (run / "adapters" / "keyword" / "adapter.safetensors").read_bytes()
    model, data, trainer = _fit(tiny_dir, task_dir, run, tmp_path, epochs=1)
    with pytest.raises(MTLConfigError, match="already exists"):
        trainer.fit(model, datamodule=data)
    assert (run / "adapters" / "keyword" / "adapter.safetensors").read_bytes() == saved


def test_cli_fit_validate_predict(tiny_dir, task_dir, tmp_path, capsys):
    run = tmp_path / "cli"
    common = ["--model.backbone", str(tiny_dir), "--data.tasks", "[keyword]", "--data.tasks_dir", str(task_dir),
              "--data.cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--model.run_dir", str(run),
              "--trainer.default_root_dir", str(run)]
    main(["fit", *common, "--trainer.max_epochs", "1"])
    assert (run / "adapters" / "keyword" / "adapter.safetensors").is_file()
    ckpt = next(run.rglob("*.ckpt"))
    main(["validate", *common, "--ckpt_path", str(ckpt)])
    main(["test", *common, "--ckpt_path", str(ckpt)])
    main(["predict", *common, "--ckpt_path", str(ckpt)])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *common, "--trainer.max_epochs", "1"])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_print_config_shows_resolved_adapter_settings(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "type: pfeiffer" in out and "default_root_dir: checkpoints/quickstart/lightning" in out


@pytest.mark.parametrize("backbone_dropout", [False, True])
def test_training_steps_run_the_heads_and_adapters_dropout_and_the_backbones_only_when_asked(
        tiny_dir, task_dir, tmp_path, backbone_dropout):
    modes = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:  # epoch 1 and epoch 2, after a validation that switched everything to eval
                modes.append((module.model.backbone.training, {m.training for m in module.model.heads.modules()},
                              {s.adapters.training for s in module.model.iter_slots()}))

    module = AdapterTrainer(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path / "run"),
                            export=False, backbone_dropout=backbone_dropout)
    data = TaskDataModule(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), batch_size=16,
                          cache_dir=str(tmp_path / "cache"))
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Modes()]).fit(module, datamodule=data)
    assert modes == [(backbone_dropout, {True}, {True})] * 2
