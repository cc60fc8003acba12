"""`LightningCLI` for mtl: YAML configs in omegaconf mode, one-line errors for user mistakes."""

from __future__ import annotations

import difflib
import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from mtl.data.module import TaskDataModule  # noqa: E402
from mtl.errors import MTLConfigError  # noqa: E402
from mtl.lit import AdapterTrainer  # noqa: E402
from mtl.preflight import preflight  # noqa: E402


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
        """Run the checks of `mtl.preflight` first: a mistake found here leaves nothing written."""
        if self.subcommand is not None:
            preflight(self.subcommand, self.model, self.datamodule, self._get(self.config_init, "trainer", {}),
                      self.config[self.subcommand].get("ckpt_path"))
        return super().instantiate_trainer(**kwargs)

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


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config`` / ``-c``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_file(path: str) -> dict[str, Any]:
    """Read one ``--config`` file: it exists and is a YAML mapping (errors name the file and the line)."""
    file = Path(path)
    if not file.is_file():
        raise MTLConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise MTLConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        raise MTLConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if data is not None and not isinstance(data, dict):
        raise MTLConfigError(f"{path}: top level is a {type(data).__name__}, expected a mapping (model:, data:, ...)")
    return data or {}


def _has_key(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def closest_key(key: str, keys: list[str]) -> str | None:
    """The valid key most like ``key``: first among its siblings, then among all keys."""
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    for pool in (siblings, keys):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def explain_parse_error(message: str, keys: list[str], files: list[str]) -> str:
    """One line for a jsonargparse error: the file or option, the key, and what was expected."""
    keys = [k for k in keys if not k.endswith(".help") and k not in ("help", "print_config", "print_shtab")]
    unknown = re.search(r"(?:Group '([^']+)' )?does not accept option '([^']+)'", message)
    if unknown:
        group, key = unknown.groups()
        key = f"{group}.{key}" if group and not key.startswith(f"{group}.") else key
        where = next((f for f in reversed(files) if _has_key(check_config_file(f), key)), "config")
        near = closest_key(key, keys)
        return f"{where}: {key}: unknown key" + (f", did you mean '{near}'?" if near else "")
    unrecognized = re.search(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        option = unrecognized.group(1).split("=", 1)[0]
        near = closest_key(option.lstrip("-"), keys) if option.startswith("--") else None
        return f"{option}: unknown option" + (f", did you mean '--{near}'?" if near else "")
    flat = " ".join(message.split())
    parser_key = re.match(r'Parser key "([^"]+)": (.*)', flat)
    if parser_key:
        key, rest = parser_key.groups()
        rest = re.sub(r"<class '(\w+)'>", r"\1", rest)
        missing = re.fullmatch(r"Expected an? (.+?)\. Got value: None", rest)
        if missing:
            return f"{key}: missing, expected a {missing.group(1)}"
        return f"{key}: {rest}"[:400]
    return flat[:400]


def explain_interpolation_error(err: Exception) -> str:
    """One line for an omegaconf error: the key holding the ``${...}`` and the key it refers to."""
    def strip(key: str) -> str:  # keys are reported from above the subcommand ('fit.model.lr')
        head, _, rest = key.partition(".")
        return rest if head in LightningCLI.subcommands() else key

    key = strip(str(getattr(err, "full_key", "") or "config"))
    target = re.search(r"resolved to '([^']+)'", str(err))
    if target:
        return f"{key}: ${{...}} refers to '{strip(target.group(1))}', which is not a key of the configuration"
    return f"{key}: {str(err).splitlines()[0]}"


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python train.py``: LightningCLI's fit / validate / test / predict, plus ``continual`` (train a
    task sequence, `mtl.continual.cli`), ``compare`` (continual runs side by side) and ``import-adapterhub``
    (AdapterHub folders into an mtl run folder, `mtl.interop.adapterhub_cli`)."""
    # resolve ${...} after all sources are merged, so command-line overrides reach interpolated values
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    argv = list(sys.argv[1:] if args is None else args)
    try:
        for file in config_files(argv):
            check_config_file(file)
        commands = [*LightningCLI.subcommands(), "continual", "compare", "import-adapterhub"]
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
        if argv[:1] == ["import-adapterhub"]:  # AdapterHub folders -> an mtl run folder (mtl.interop.adapterhub_cli)
            from mtl.interop.adapterhub_cli import import_main

            import_main(argv[1:])
            return
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
    """The user mistake behind ``err`` (an `MTLConfigError`, or Lightning refusing a trainer setting), also when
    jsonargparse wrapped it while instantiating a class."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MTLConfigError):
            return err
        if isinstance(err, MisconfigurationException):
            return MTLConfigError(f"trainer: {' '.join(str(err).split())}")
        if isinstance(err, OmegaConfBaseException):  # a ${...} that does not resolve
            return MTLConfigError(explain_interpolation_error(err))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
