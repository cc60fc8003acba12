"""`LightningCLI` for mtl: YAML configs in omegaconf mode, one-line errors for user mistakes."""

from __future__ import annotations

import difflib
import os
import sys
import time
from argparse import ArgumentError
from pathlib import Path
from typing import Any

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

from mtl.checkpoint_io import with_atomic_checkpoints  # noqa: E402
from mtl.cli_errors import check_config_file, config_files, explain_parse_error, user_mistake  # noqa: E402
from mtl.console import QUIET_TRAINER_DEFAULTS, fit_summary, quiet_lightning  # noqa: E402
from mtl.data.module import TaskDataModule  # noqa: E402
from mtl.errors import WRITE_ERRNOS, MTLConfigError, MTLWriteError, write_failure  # noqa: E402
from mtl.lit import AdapterTrainer  # noqa: E402
from mtl.precision import resolve_precision  # noqa: E402
from mtl.preflight import preflight  # noqa: E402

# Trainer options mtl sets differently from Lightning (a config or the command line still wins); the task batch
# sampler shards by rank itself, so Lightning must not wrap it
TRAINER_DEFAULTS = {"use_distributed_sampler": False, **QUIET_TRAINER_DEFAULTS}


class MTLCLI(LightningCLI):
    """Links the task list and backbone between model and data, so each is given once."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers that raise on a mistake (one line, no usage text) and never expand abbreviated options."""
        return super().init_parser(**{"exit_on_error": False, "allow_abbrev": False, **kwargs})

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tasks", "model.tasks")
        parser.link_arguments("data.tasks_dir", "model.tasks_dir")
        parser.link_arguments("data.eval_tasks", "model.eval_tasks")
        parser.link_arguments("model.backbone", "data.backbone")

    def _parse_ckpt_path(self) -> None:
        # Lightning would load the checkpoint's hyperparameters over the config and the command line; mtl keeps the
        # configuration and checks the checkpoint against it in `preflight` instead
        return

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Run the checks of `mtl.preflight` first (a mistake found here leaves nothing written), then build the
        Trainer with the precision `mtl.precision` picks when ``trainer.precision`` is unset."""
        trainer_config = self._get(self.config_init, "trainer", {})
        if self.subcommand is not None:
            preflight(self.subcommand, self.model, self.datamodule, trainer_config,
                      self.config[self.subcommand].get("ckpt_path"))
        precision, line = resolve_precision(trainer_config)
        rank_zero_only(print)(line)  # once, not once per DDP process
        plugins = with_atomic_checkpoints(trainer_config.get("plugins"))
        return super().instantiate_trainer(**{"precision": precision, "plugins": plugins, **kwargs})

    def before_fit(self) -> None:
        """Start the clock of fit's summary line."""
        self._fit_started = time.monotonic()

    def after_fit(self) -> None:
        """Test the best checkpoint in this process (``model.test_after_fit``), then print fit's one summary line."""
        trainer, model = self.trainer, self.model
        fit_seconds = time.monotonic() - self._fit_started
        test_metrics, tested, test_seconds = None, "", 0.0
        if model.hparams.test_after_fit and not trainer.interrupted:
            start = time.monotonic()
            # the best checkpoint's trainable tensors, as `test --ckpt_path` loads them (already so when fit exported)
            best = model.restore_best()
            tested = "best checkpoint" if best else "last weights: no checkpoint was kept"
            trainer.test(model, datamodule=self.datamodule, verbose=False)
            test_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            test_seconds = time.monotonic() - start
        if trainer.is_global_zero:
            print(fit_summary(trainer, model.exported, fit_seconds, test_metrics, test_seconds, tested))

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; an output that cannot be written mid-run (a checkpoint, a log, an export) is one line naming the
        path, the OS error and where the trained weights are."""
        try:
            super()._run_subcommand(subcommand)
        except MTLWriteError as err:  # a checkpoint or an export: fit's training is not lost, say where it is
            if subcommand != "fit":
                raise
            raise MTLWriteError(f"{err}; {self.model.kept_weights()}") from None
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                raise
            where = Path(err.filename).parent if err.filename else Path(self.model.hparams.run_dir)
            raise write_failure(where, err, self.model.kept_weights() if subcommand == "fit" else "") from None

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, turning a parser error into one `MTLConfigError` line that names the key or option."""
        argv = list(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            subcommands = getattr(self, "_subcommand_parsers", {})  # none with run=False
            sub = next((a for a in argv if a in subcommands), None)
            keys = sorted({a.dest for a in subcommands.get(sub, parser)._actions})
            raise MTLConfigError(explain_parse_error(str(err), keys, config_files(argv))) from None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python train.py``: LightningCLI's fit / validate / test / predict, plus ``continual`` (train a
    task sequence, `mtl.continual.cli`), ``compare`` (continual runs side by side), ``import-adapterhub``
    (AdapterHub folders into an mtl run folder, `mtl.interop.adapterhub_cli`) and ``serve`` (`mtl.serving`)."""
    # resolve ${...} after all sources are merged, so command-line overrides reach interpolated values
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    quiet_lightning()
    argv = list(sys.argv[1:] if args is None else args)
    try:
        for file in config_files(argv):
            check_config_file(file)
        commands = [*LightningCLI.subcommands(), "continual", "compare", "import-adapterhub", "serve"]
        if argv and not argv[0].startswith("-") and argv[0] not in commands:
            near = difflib.get_close_matches(argv[0], commands, n=1)
            raise MTLConfigError(f"{argv[0]}: unknown command, expected one of {', '.join(commands)}"
                                 + (f"; did you mean '{near[0]}'?" if near else ""))
        if argv[:1] == ["continual"]:  # the task-sequence runner: its own parser, the same YAML sections
            from mtl.continual.cli import continual_main

            continual_main(argv[1:])
            return
        if argv[:1] == ["compare"]:  # continual runs side by side
            from mtl.continual.report import compare_main

            compare_main(argv[1:])
            return
        if argv[:1] == ["serve"]:  # one backbone, a store of adapters, LitServe (mtl.serving)
            from mtl.serving.cli import serve_main

            serve_main(argv[1:])
            return
        if argv[:1] == ["import-adapterhub"]:  # AdapterHub folders -> an mtl run folder (mtl.interop.adapterhub_cli)
            from mtl.interop.adapterhub_cli import import_main

            import_main(argv[1:])
            return
        MTLCLI(AdapterTrainer, TaskDataModule, parser_kwargs={"parser_mode": "omegaconf+"},
               save_config_kwargs={"overwrite": True}, args=args, trainer_defaults=TRAINER_DEFAULTS)
    except Exception as err:  # noqa: BLE001 - user mistakes become one line; anything else keeps its traceback
        mistake = user_mistake(err)
        if mistake is None:
            raise
        print(f"error: {mistake}", file=sys.stderr)
        raise SystemExit(2) from None
