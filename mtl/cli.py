"""`LightningCLI` for mtl: YAML configs in omegaconf mode, one-line errors for user mistakes."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from mtl.data.module import TaskDataModule  # noqa: E402
from mtl.errors import MTLConfigError  # noqa: E402
from mtl.lit import AdapterTrainer  # noqa: E402


class MTLCLI(LightningCLI):
    """Links the task list and backbone between model and data, so each is given once."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tasks", "model.tasks")
        parser.link_arguments("data.tasks_dir", "model.tasks_dir")
        parser.link_arguments("data.eval_tasks", "model.eval_tasks")
        parser.link_arguments("model.backbone", "data.backbone")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python train.py``."""
    # resolve ${...} after all sources are merged, so command-line overrides reach interpolated values
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    try:
        MTLCLI(AdapterTrainer, TaskDataModule, parser_kwargs={"parser_mode": "omegaconf+"},
               save_config_kwargs={"overwrite": True}, args=args,
               # the task batch sampler shards by rank itself; Lightning must not wrap it
               trainer_defaults={"use_distributed_sampler": False})
    except Exception as err:  # noqa: BLE001 - user mistakes become one line; anything else keeps its traceback
        mistake = user_mistake(err)
        if mistake is None:
            raise
        print(f"error: {mistake}", file=sys.stderr)
        raise SystemExit(2) from None


def user_mistake(err: BaseException) -> MTLConfigError | None:
    """The `MTLConfigError` behind ``err``, also when jsonargparse wrapped it while instantiating a class."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MTLConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
