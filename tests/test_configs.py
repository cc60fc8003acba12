"""Every YAML under configs/ builds through the CLI, and every tasks/*.yaml is a valid spec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtl import model_files
from mtl.cli import MTLCLI, main
from mtl.continual.cli import build_parser
from mtl.continual.runner import ContinualConfig, ContinualRunner
from mtl.data.module import TaskDataModule
from mtl.data.spec import load_task_spec
from mtl.lit import AdapterTrainer
from mtl.serving.cli import parse as parse_serve
from mtl.serving.store import AdapterStore
from mtl.model import MTLModel

ROOT = Path(__file__).resolve().parents[1]
def _configs(section: str | None) -> list[Path]:
    """configs/*.yaml with a top-level ``section:`` (None: neither continual nor serve, i.e. LightningCLI's)."""
    found = {p: next((s for s in ("continual", "serve") if re.search(rf"^{s}:", p.read_text(), re.M)), None)
             for p in (ROOT / "configs").glob("*.yaml")}
    return sorted(p for p, s in found.items() if s == section)


CONFIGS, CONTINUAL_CONFIGS, SERVE_CONFIGS = _configs(None), _configs("continual"), _configs("serve")
TASKS = sorted((ROOT / "tasks").glob("*.yaml"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Exported (fresh) adapters on MiniLM for every task, for configs that load a trained system."""
    run = tmp_path_factory.mktemp("trained")
    model = MTLModel("minilm-l6")
    for path in TASKS:
        spec = load_task_spec(str(path))
        model.add_task(spec.name, len(spec.labels), labels=spec.labels, spec=spec.to_dict())
        model_files.save_task(model, spec.name, run / "adapters")
    return run


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_builds(path, monkeypatch, trained_run, tmp_path):
    monkeypatch.chdir(ROOT)
    from jsonargparse import set_parsing_settings

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    args = ["--config", str(path), "--model.run_dir", "/tmp/mtl-config-check"]
    if "load_from:" in path.read_text():  # the fixture run already holds every task, so allow retraining one
        args += ["--model.load_from", str(trained_run), "--model.overwrite", "true"]
    cli = MTLCLI(AdapterTrainer, TaskDataModule, parser_kwargs={"parser_mode": "omegaconf+"}, args=args, run=False)
    assert cli.model.hparams.tasks == cli.datamodule.hparams.tasks
    fusion = cli.model.hparams.fusion
    if fusion is not None:
        assert cli.model.model.target(fusion["name"]).fused == tuple(fusion["adapters"])
        assert cli.model.model.trainable_tasks() == [fusion["name"]]
    # the interpolated trainer folder follows the command-line override of model.run_dir
    assert cli.trainer.default_root_dir.startswith("/tmp/mtl-config-check")


@pytest.mark.parametrize("path", CONTINUAL_CONFIGS, ids=[p.name for p in CONTINUAL_CONFIGS])
def test_continual_config_builds(path, monkeypatch, tmp_path):
    """A ``train.py continual`` config parses, passes every check before work, and builds its first model."""
    monkeypatch.chdir(ROOT)
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(path), "--continual.run_dir", str(tmp_path / "run")])
    runner = ContinualRunner(ContinualConfig(**cfg.continual.as_dict()), cfg.model.as_dict(), cfg.data.as_dict(),
                             make_trainer=None, settings={})
    assert runner.check() is None  # nothing to resume
    assert len(runner.stages) >= 1 and not (tmp_path / "run").exists()
    module = runner._module(runner.order, None)
    assert sorted(module.model.tasks) == sorted(module.model.trainable_tasks()) == sorted(runner.order)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_config_parses_and_its_store_indexes(path, monkeypatch, trained_run):
    """A ``train.py serve`` config passes every check made before the server starts (the store pointed at a run)."""
    monkeypatch.chdir(ROOT)
    config = parse_serve(["--config", str(path), "--serve.store", str(trained_run)])
    assert config.host == "127.0.0.1" and config.store == str(trained_run)
    store = AdapterStore(config.store, config.max_resident)
    assert sorted(store.snapshot()) == sorted(p.stem for p in TASKS) and store.backbone() == "minilm-l6"


@pytest.mark.parametrize("path", TASKS, ids=[p.name for p in TASKS])
def test_task_spec_loads(path):
    spec = load_task_spec(str(path))
    assert spec.name == path.stem and (bool(spec.labels) or spec.problem == "extractive_qa")  # QA has no label names


def test_bad_config_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  adapter:\n    type: lora\ndata:\n  tasks: [bbc_news]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("lora" in line for line in err)
