"""A whole ``train.py fit`` as a user sees it, on a tiny backbone (seconds): what it prints, and the test of the best
checkpoint at its end; a continual run's output."""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from safetensors.torch import load_file

from mtl import precision as precision_module
from mtl import storage
from mtl.cli import MTLCLI, TRAINER_DEFAULTS, main
from mtl.console import CHATTER, DropMessages, duration, quiet_lightning
from mtl.data.module import TaskDataModule
from mtl.lit import AdapterTrainer

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# what Lightning printed on every fit (and predict) before; none of it may come back
NOISE = ["GPU available", "TPU available", "litlogger", "litmodels", "Tip:", "No seed found", "LeafSpec",
         "log_every_n_steps", "Total FLOPs", "Trainable params", "Non-trainable params", "Seed set to", "to estimate number of stepping batches",
         "`Trainer.fit` stopped", "Automatic Mixed Precision", "restored the best checkpoint"]
SUMMARY = re.compile(r"^fit: 2 epochs, \d+ steps in \d+ s; best val/avg/score 0\.\d{3} \((?P<ckpt>\S+/best\.ckpt)\); "
                     r"test \(best checkpoint, \d+ s\): keyword acc 0\.\d{3} f1 0\.\d{3}; "
                     r"exported keyword -> (?P<export>\S+/adapters/keyword)$")


def quickstart(tiny_dir: Path, task_dir: Path, root: Path, *extra: str) -> list[str]:
    """``configs/quickstart.yaml`` on the tiny backbone and the keyword task, into ``root/run``."""
    return ["--config", str(QUICKSTART), "--model.backbone", str(tiny_dir), "--data.tasks", "[keyword]",
            "--data.tasks_dir", str(task_dir), "--data.cache_dir", str(root / "cache"), "--model.run_dir",
            str(root / "run"), "--trainer.max_epochs", "2", "--data.batch_size", "16", *extra]


def logged(run: Path, version: int = 0) -> dict[str, float]:
    """The last value of every test/ column of ``version``'s metrics.csv."""
    rows = list(csv.DictReader((run / "lightning" / "logs" / f"version_{version}" / "metrics.csv").open()))
    return {k: float(row[k]) for row in rows for k in row if k.startswith("test/") and row[k]}


def best_weights(tiny_dir: Path, task_dir: Path, ckpt: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The keyword task's parameters (export names, float32) after loading ``ckpt`` into a fresh quickstart module."""
    module = AdapterTrainer(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path / "x"),
                            adapter={"type": "pfeiffer", "reduction_factor": 16})
    module.load_trainable(ckpt)
    return {k: v.detach() for k, v in module.model.task_parameters("keyword").items()}


def assert_export_is(weights: dict[str, torch.Tensor], run: Path) -> None:
    """``run``'s exported keyword adapter and head hold exactly ``weights``, in float32."""
    exported = load_file(run / "adapters" / "keyword" / storage.ADAPTER_WEIGHTS)
    assert exported.keys() == weights.keys() and {t.dtype for t in exported.values()} == {torch.float32}
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


def cli_for(tiny_dir: Path, task_dir: Path, tmp_path: Path, *extra: str) -> MTLCLI:
    """train.py's CLI on the keyword task, parsed and instantiated (Trainer included) but not run."""
    return MTLCLI(AdapterTrainer, TaskDataModule, run=False, trainer_defaults=TRAINER_DEFAULTS,
                  args=["--model.backbone", str(tiny_dir), "--data.tasks", "[keyword]", "--data.tasks_dir",
                        str(task_dir), "--data.cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
                        "--trainer.default_root_dir", str(tmp_path), *extra])


@pytest.fixture
def native_bf16_cpu(monkeypatch):
    """A CPU that computes bf16 natively, whatever this machine is (bf16 is only emulated, slower, elsewhere)."""
    monkeypatch.setattr(precision_module, "cpu_features", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---- 1. what a fit prints ------------------------------------------------------------------------------------------
def test_quickstart_fit_prints_the_table_the_precision_and_one_summary_line(tiny_dir, task_dir, tmp_path, capfd,
                                                                           recwarn, native_bf16_cpu, caplog):
    caplog.set_level(logging.INFO)  # under pytest, Lightning's log lines reach its capture handler, not stderr
    main(["fit", *quickstart(tiny_dir, task_dir, tmp_path)])
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    assert [n for n in NOISE if n in text] == []
    # Lightning's warnings go through pytest's recorder here, not stderr: the two filtered ones never came
    assert [str(w.message)[:80] for w in recwarn if "LeafSpec" in str(w.message) or "logging interval" in
            str(w.message)] == []
    lines = [line.strip() for line in out.splitlines()]
    assert lines.count("precision: bf16-mixed (CPU has AVX512-BF16; set trainer.precision to choose)") == 1
    assert "backbone (frozen): " in out and re.search(r"^adapter\s+keyword\s+\d+\s+2\s+trainable", out, re.M)
    summary = [line for line in lines if line.startswith("fit: ")]
    assert len(summary) == 1 and SUMMARY.match(summary[0]), summary
    found = SUMMARY.match(summary[0])
    assert Path(found["ckpt"]).is_file() and Path(found["export"]) == tmp_path / "run" / "adapters" / "keyword"
    assert lines.index(summary[0]) > max(i for i, line in enumerate(lines) if line.startswith("backbone (frozen)"))


def test_a_real_warning_and_other_lightning_lines_still_show(recwarn):
    quiet_lightning()
    quiet_lightning()  # twice adds nothing
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(isinstance(f, DropMessages) for f in rank_zero.filters) == 1

    def shown(logger: logging.Logger, message: str) -> bool:
        return logger.filter(logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None)) is not False

    assert not shown(rank_zero, "GPU available: False, used: False")
    assert not shown(rank_zero, "`Trainer.fit` stopped: `max_epochs=3` reached.")
    assert shown(rank_zero, "`Trainer.fit` stopped: `max_steps=10` reached.")  # an early stop says why
    assert shown(rank_zero, "Restoring states from the checkpoint path at x.ckpt")
    assert not shown(logging.getLogger("lightning.fabric.utilities.seed"), "[rank: 1] Seed set to 7")
    assert all(name.startswith("lightning.") for name in CHATTER)
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, elsewhere", FutureWarning)  # not Lightning's
    warnings.warn("The number of training batches (3) is smaller than nothing", UserWarning)
    assert len(recwarn) == 2


def test_lightning_model_summary_is_off_and_the_loss_logged_every_10_steps(tiny_dir, task_dir, tmp_path):
    trainer = cli_for(tiny_dir, task_dir, tmp_path).trainer
    assert not [c for c in trainer.callbacks if isinstance(c, ModelSummary)] and trainer.log_every_n_steps == 10
    asked = cli_for(tiny_dir, task_dir, tmp_path, "--trainer.enable_model_summary", "true",
                    "--trainer.log_every_n_steps", "50").trainer
    assert [c for c in asked.callbacks if isinstance(c, ModelSummary)] and asked.log_every_n_steps == 50


def test_duration_reads_as_minutes_and_seconds():
    assert (duration(4.4), duration(59.6), duration(161)) == ("4 s", "1 min 00 s", "2 min 41 s")


# ---- 2. fit ends by testing its best checkpoint ---------------------------------------------------------------------
def test_the_test_after_fit_equals_a_separate_test_of_the_best_checkpoint(tiny_dir, task_dir, tmp_path, capfd):
    args = quickstart(tiny_dir, task_dir, tmp_path, "--trainer.enable_progress_bar", "false")
    main(["fit", *args])
    after_fit = logged(tmp_path / "run", 0)
    best = next((tmp_path / "run").rglob("best.ckpt"))
    assert set(after_fit) == {"test/keyword/acc", "test/keyword/f1", "test/keyword/loss", "test/avg/acc", "test/avg/f1",
                              "test/avg/score"}
    main(["test", *args, "--ckpt_path", str(best)])
    assert logged(tmp_path / "run", 1) == after_fit  # the same numbers, exactly
    summary = next(line for line in capfd.readouterr().out.splitlines() if line.startswith("fit: "))
    assert f"keyword acc {after_fit['test/keyword/acc']:.3f} f1 {after_fit['test/keyword/f1']:.3f}" in summary
    # the export is the best checkpoint's weights, as before
    assert_export_is(best_weights(tiny_dir, task_dir, best, tmp_path), tmp_path / "run")


def test_validate_test_predict_and_import_print_none_of_lightnings_chatter(tiny_dir, task_dir, tmp_path, capfd,
                                                                           recwarn, monkeypatch, caplog):
    from mtl.interop.adapterhub import save_adapterhub
    from mtl.model import MTLModel

    args = quickstart(tiny_dir, task_dir, tmp_path, "--trainer.enable_progress_bar", "false",
                      "--trainer.max_epochs", "1", "--model.test_after_fit", "false")
    main(["fit", *args])
    best, run = next((tmp_path / "run").rglob("best.ckpt")), tmp_path / "run"
    texts = tmp_path / "texts.txt"
    texts.write_text("good alpha beta river\nbeta red gamma stone\n")
    bare = ["--model.backbone", str(tiny_dir), "--data.tasks", "[]", "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "bare")]
    save_adapterhub(MTLModel.from_pretrained(run, backbone=str(tiny_dir)), "keyword", tmp_path / "ah" / "keyword")
    capfd.readouterr()
    commands = {  # each as a user types it: no seed, Lightning's default checkpoint callback where it makes one
        "validate": ["validate", *args, "--ckpt_path", str(best)],
        "test": ["test", *args, "--ckpt_path", str(best)],
        "predict": ["predict", *bare, "--model.load_from", str(run), "--model.run_dir", str(run), "--trainer.logger", "false",
                    "--data.predict_file", str(texts), "--trainer.callbacks+=mtl.predict.PredictionWriter",
                    f"--trainer.callbacks.output={tmp_path / 'out.jsonl'}"],
        "import-adapterhub": ["import-adapterhub", str(tmp_path / "ah" / "keyword"), "--backbone", str(tiny_dir),
                              "--run_dir", str(tmp_path / "imported"), "--num_labels", "2"],
    }
    caplog.set_level(logging.INFO)  # under pytest, Lightning's log lines reach its capture handler, not stderr
    for name, command in commands.items():
        monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # a seeded command before must not hide "No seed found"
        caplog.clear()
        main(command)
        out, err = capfd.readouterr()
        assert "Restoring states" in caplog.text or name in ("predict", "import-adapterhub")  # the capture works
        assert [n for n in NOISE if n in out + err + caplog.text] == [], (name, out + err + caplog.text)
        assert [str(w.message)[:80] for w in recwarn if any(n in str(w.message) for n in NOISE)] == [], name
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2 and (tmp_path / "imported" / "adapters").is_dir()


def test_test_after_fit_false_skips_the_test_and_exports_the_same_bytes(tiny_dir, task_dir, tmp_path, capfd):
    files = {}
    for flag in ("true", "false"):
        root = tmp_path / flag
        main(["fit", *quickstart(tiny_dir, task_dir, root, "--trainer.enable_progress_bar", "false",
                                 "--model.test_after_fit", flag)])
        files[flag] = {p.name: p.read_bytes() for p in (root / "run" / "adapters" / "keyword").iterdir()}
        summary = next(line for line in capfd.readouterr().out.splitlines() if line.startswith("fit: "))
        assert ("; test (best checkpoint" in summary) == (flag == "true")
        assert bool(logged(root / "run")) == (flag == "true")
    assert files["true"] == files["false"]


# ---- 3. the continual runner -------------------------------------------------------------------------------------
def test_a_continual_run_prints_the_precision_once_and_no_lightning_chatter(tiny_dir, task_dir, tmp_path, capfd,
                                                                            recwarn, native_bf16_cpu, monkeypatch,
                                                                            caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(f"""
continual: {{order: [keyword, colour], strategy: per_task, run_dir: {run}, tasks_dir: {task_dir}, routers: []}}
model: {{backbone: {tiny_dir}, lr: 1.0e-2}}
data: {{batch_size: 16, cache_dir: {tmp_path / 'cache'}, max_train_examples: 32}}
trainer: {{max_epochs: 1, logger: false, enable_checkpointing: false, enable_progress_bar: false}}
""")
    main(["continual", "--config", str(tmp_path / "c.yaml")])
    out, err = capfd.readouterr()
    assert [n for n in NOISE if n in out + err + caplog.text] == []
    assert [str(w.message)[:80] for w in recwarn if "LeafSpec" in str(w.message)] == []
    assert out.count("precision: bf16-mixed (CPU has AVX512-BF16") == 1 and out.count("precision: ") == 1
    assert out.count("backbone (frozen): ") == 2  # mtl's table, once per stage
    # the precision every stage trained in is recorded, so a resume on other hardware cannot change it silently
    assert json.loads((run / "results.json").read_text())["config"]["trainer.precision"] == "bf16-mixed"
    monkeypatch.setattr(precision_module, "cpu_features", lambda: {"avx2"})
    with pytest.raises(SystemExit) as done:
        main(["continual", "--config", str(tmp_path / "c.yaml")])
    err = capfd.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and err[-1].startswith("error: ")
    assert "trainer.precision is 'bf16-mixed' in the saved run but '32-true' in the configuration" in err[-1]
    main(["continual", "--config", str(tmp_path / "c.yaml"), "--trainer.precision", "bf16-mixed"])  # as it ran
    # a run saved before the precision was resolved: unset meant fp32
    state = json.loads((run / "state.json").read_text())
    state["settings"]["trainer.precision"] = None
    (run / "state.json").write_text(json.dumps(state))
    main(["continual", "--config", str(tmp_path / "c.yaml")])  # this CPU now picks 32-true: the same


def test_the_adapterdrop_hint_shows_only_where_a_fit_would_gain_from_it(tiny_dir, task_dir, tmp_path):
    from types import SimpleNamespace

    from transformers import BertConfig, BertModel

    from mtl.adapters.config import AdapterConfig
    from mtl.model import MTLModel

    module = cli_for(tiny_dir, task_dir, tmp_path).model

    def hint(adapter: AdapterConfig, epochs: int = 3, layers: int = 4, **state) -> str | None:
        torch.manual_seed(0)
        backbone = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
        module.model = MTLModel(backbone, backbone_dropout=state.pop("backbone_dropout", False))
        module.model.add_task("keyword", 2, adapter)
        module.hparams.cache_frozen_prefix = state.pop("cache", False)
        module._trainer = SimpleNamespace(max_epochs=epochs, world_size=state.pop("world_size", 1))
        return module.adapterdrop_hint()

    line = hint(AdapterConfig())
    assert line.startswith("hint: model.adapter.drop_first: 2 with model.cache_frozen_prefix: true runs layers 1-2 ")
    assert "\n" not in line
    # already dropping or caching, one epoch (the cache would only fill), backbone dropout, DDP, a 2-layer model
    for adapter, kwargs in [(AdapterConfig(drop_first=1), {}), (AdapterConfig(robust_drop=True), {}),
                            (AdapterConfig(), {"cache": True}), (AdapterConfig(), {"epochs": 1}),
                            (AdapterConfig(), {"backbone_dropout": True}), (AdapterConfig(), {"world_size": 2}),
                            (AdapterConfig(), {"layers": 2})]:
        assert hint(adapter, **kwargs) is None, (adapter, kwargs)
