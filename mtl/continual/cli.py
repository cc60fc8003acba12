"""``python train.py continual --config configs/continual.yaml``: the task-sequence runner from a YAML config.

The config has the sections of ``train.py fit`` (``model``, ``data``, ``trainer``, ``seed_everything``, parsed by
the same jsonargparse machinery in omegaconf mode) plus ``continual`` (`ContinualConfig`). The keys the runner
sets itself per stage (the tasks, what is loaded, where adapters go) are not accepted under ``model`` / ``data``.
"""

from __future__ import annotations

import re
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from mtl.checkpoint_io import with_atomic_checkpoints
from mtl.cli_errors import config_files, explain_parse_error
from mtl.console import QUIET_TRAINER_DEFAULTS
from mtl.continual.runner import ContinualConfig, ContinualRunner
from mtl.data.module import TaskDataModule
from mtl.errors import WRITE_ERRNOS, MTLConfigError, write_failure
from mtl.lit import AdapterTrainer
from mtl.precision import resolve_precision
from mtl.preflight import check_single_process, writable_folder

# set per stage by the runner (or by the strategy: adapter_sharing)
RUNNER_MODEL_KEYS = {"tasks", "tasks_dir", "run_dir", "overwrite", "export", "adapter_sharing", "load_from",
                     "eval_tasks", "fusion", "continue_training", "eval_routes"}
RUNNER_DATA_KEYS = {"tasks", "backbone", "tasks_dir", "eval_tasks", "predict_split", "predict_file",
                    "predict_text_field", "predict_max_length", "train_subsets", "task_weights"}
# what to set instead of a runner key, by "section.key" or by key in either section (the rest, such as load_from or
# export, are the runner's own per stage and have no counterpart)
INSTEAD = {"tasks_dir": "; set continual.tasks_dir instead",
           "model.run_dir": "; set continual.run_dir instead",
           "data.backbone": "; set model.backbone instead (the data is tokenized for the model's backbone)",
           "model.fusion": "; set continual.fusion instead (with continual.strategy fusion)",
           "model.adapter_sharing": "; continual.strategy decides it (shared: one adapter for every task)"}


def build_parser() -> LightningArgumentParser:
    """The parser of the ``continual`` command."""
    parser = LightningArgumentParser(description="Train a sequence of tasks and measure forgetting",
                                     exit_on_error=False, allow_abbrev=False, parser_mode="omegaconf+")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config file")
    parser.add_argument("--seed_everything", type=int, default=0, help="seed of the fresh adapters and of training")
    parser.add_class_arguments(ContinualConfig, "continual")
    parser.add_class_arguments(AdapterTrainer, "model", skip=RUNNER_MODEL_KEYS, instantiate=False)
    parser.add_class_arguments(TaskDataModule, "data", skip=RUNNER_DATA_KEYS, instantiate=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.set_defaults({f"trainer.{key}": value for key, value in QUIET_TRAINER_DEFAULTS.items()})
    return parser


def _plain(value: Any) -> Any:
    """A parsed (sub)config as plain dicts and lists."""
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else value


def continual_main(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` (after ``continual``), run the sequence, return the results."""
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:
        keys = sorted({a.dest for a in parser._actions})
        message = explain_parse_error(str(err), keys, config_files(argv))
        # a mapping value (model.fusion: {type: ...}) is reported at its first nested key: name the runner key itself
        key = re.match(r"((?:\S+: )?-*((model|data)\.(\w+)))[\w.]*: unknown", message)
        if key and key.group(4) in (RUNNER_MODEL_KEYS if key.group(3) == "model" else RUNNER_DATA_KEYS):
            instead = INSTEAD.get(key.group(2), INSTEAD.get(key.group(4), " (the tasks come from continual.order)"))
            message = (f"{key.group(1)}: set by the continual runner for each stage, not in a continual config"
                       f"{instead}")
        raise MTLConfigError(message) from None
    settings = yaml.safe_load(parser.dump(cfg, skip_none=False))
    settings.pop("config", None)
    config = ContinualConfig(**_plain(cfg.continual))
    trainer_config = _plain(cfg.trainer)
    check_single_process(trainer_config, "train.py continual")  # before anything is written or launched
    if trainer_config.get("default_root_dir"):
        writable_folder(trainer_config["default_root_dir"], "trainer.default_root_dir")
    precision, line = resolve_precision(trainer_config)  # once for every stage
    print(line)
    # the precision the stages train in, not 'unset': a run resumed on other hardware must not change it silently
    settings["trainer"]["precision"] = precision

    def make_trainer(stage: str) -> Trainer:
        # instantiated again for every stage: fresh callbacks and logger (they keep state between fits)
        kwargs = dict(vars(parser.instantiate_classes(cfg).trainer))
        kwargs["precision"] = precision
        kwargs["plugins"] = with_atomic_checkpoints(kwargs.get("plugins"))
        root = Path(kwargs.pop("default_root_dir", None) or Path(config.run_dir) / "lightning")
        kwargs.setdefault("use_distributed_sampler", False)  # the task batch sampler shards by rank itself
        if kwargs.get("devices", "auto") == "auto":  # 'auto' takes every GPU (DDP); the runner is one process
            kwargs["devices"] = 1
        return Trainer(default_root_dir=str(root / stage), **kwargs)

    runner = ContinualRunner(config, _plain(cfg.model), _plain(cfg.data), make_trainer, settings,
                             seed=cfg.seed_everything)
    try:
        return runner.run()
    except OSError as err:  # a checkpoint or log the Trainer could not write; the runner's own files say so already
        if err.errno not in WRITE_ERRNOS:
            raise
        raise write_failure(Path(err.filename).parent if err.filename else Path(config.run_dir), err,
                            "the stages saved so far are kept: run the same command again to resume") from None
