"""Checks before any work starts: the mistakes mtl can find from the configuration, found before a Trainer exists.

The CLI calls `preflight` once the model and data module are built and before the Trainer is, so a run that would
fail on a user mistake writes nothing (no config.yaml, no token cache, no log folder). Each component owns its
checks (`AdapterTrainer.check_before`, `TaskDataModule.check_before`); this module adds what belongs to no single
component: the checkpoint given with ``--ckpt_path`` and the folders the Trainer's logger and callbacks write to.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from mtl import storage
from mtl.errors import MTLConfigError


def writable_folder(path: str | Path, key: str) -> None:
    """``path`` is a folder this process can write into, or can be created as one (nothing is left behind)."""
    folder = Path(path).expanduser().absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise MTLConfigError(f"{key}: {path}: {probe} is a file, expected a folder")
    try:  # os.access says yes to root on a read-only mount: try it (the probe folder is removed at once)
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".mtl-write-check-"))
    except OSError:
        raise MTLConfigError(f"{key}: {path}: {probe} is not writable by this user, expected a folder it can "
                             "write to") from None


def _logger_folders(logger: Any) -> list[tuple[str, Any]]:
    loggers = logger if isinstance(logger, (list, tuple)) else [logger]
    out = []
    for one in loggers:
        if one in (None, False, True):
            continue
        out.append(("trainer.logger", getattr(one, "save_dir", None)))
        root = getattr(one, "root_dir", None)  # save_dir/name: the version folders (and checkpoints) go in there
        if root and root != out[-1][1]:
            out.append(("trainer.logger", root))
    return out


def _callback_folders(callbacks: Any) -> list[tuple[str, Any]]:
    """The folders callbacks were told to write to (a ModelCheckpoint's ``dirpath``)."""
    return [(f"trainer.callbacks.{type(c).__name__}.dirpath", c.dirpath) for c in callbacks or []
            if getattr(c, "dirpath", None)]


def process_count(trainer_config: dict[str, Any]) -> int:
    """Processes the Trainer will start, as far as its configuration says (devices x num_nodes; 'auto' counts 1)."""
    devices = trainer_config.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            count = max(int(devices), 1)
        except (TypeError, ValueError):  # "auto" (and -1 on this CPU-only check): one device without accelerators
            count = 1
    return count * max(int(trainer_config.get("num_nodes") or 1), 1)


# Lightning strategies that run the fit in several processes (launched at fit) or shard the model over them
MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed", "xla", "hpu_parallel")


def strategy_name(strategy: Any) -> str:
    """The name of a ``trainer.strategy`` setting: a registered name, a class_path's class, or an instance's class."""
    if isinstance(strategy, str):
        return strategy
    if isinstance(strategy, dict):
        return str(strategy.get("class_path", "")).rpartition(".")[2] or "auto"
    return "auto" if strategy is None else type(strategy).__name__


def check_single_process(trainer_config: dict[str, Any], command: str) -> None:
    """Refuse trainer settings that would run ``command`` in several processes, before any process starts."""
    name = strategy_name(trainer_config.get("strategy", "auto"))
    processes = process_count(trainer_config)
    devices, nodes = trainer_config.get("devices", "auto"), trainer_config.get("num_nodes") or 1
    why = f"{command} runs in one process (it is not sharded or tested under DDP)"
    if any(key in name.lower() for key in MULTI_PROCESS_STRATEGIES):
        raise MTLConfigError(f"trainer.strategy: {name} (with trainer.devices {devices}): {why}, expected "
                             "trainer.strategy auto and trainer.devices 1")
    if processes > 1:
        key, value = ("trainer.num_nodes", f"{nodes} (x trainer.devices {devices})") if nodes != 1 else \
            ("trainer.devices", str(devices))
        raise MTLConfigError(f"{key}: {value} would start {processes} processes: {why}, expected trainer.devices 1 "
                             "and trainer.num_nodes 1")


def _check_predict_file(model: Any, data: Any) -> None:
    """Some task of the model reads the predict file's form of example: texts, questions about a context (question
    answering) or questions with answer choices (multiple choice); a router routes texts only."""
    from mtl.data.predict_input import file_form
    from mtl.kinds import KINDS, kind_of
    from mtl.kinds.base import FORM_NAMES

    form = file_form(data.predict_file, data.predict_text_field)
    kinds = {task: kind_of(head.problem) for task, head in model.model.heads.items()}
    if not any(kind.reads == form for kind in kinds.values()):
        need = "a task that reads one text" if form == "text" else \
            " or ".join(f"a task of problem {k.name}" for k in KINDS.values() if k.reads == form)
        raise MTLConfigError(f"data.predict_file: {data.predict_file}: holds {FORM_NAMES[form]}, which none of "
                             f"the model's tasks {sorted(kinds)} reads, expected a model with {need}")
    if form != "text" and getattr(model, "router", None) is not None:
        raise MTLConfigError(f"data.predict_file: {data.predict_file}: holds questions; a router picks a task for a "
                             "text, expected no model.router (every task that reads them answers)")


def preflight(stage: str, model: Any, data: Any, trainer_config: dict[str, Any], ckpt_path: str | None) -> None:
    """Run every check for ``stage`` (fit, validate, test, predict) before the Trainer is built."""
    # the settings several processes cannot run are found here, before any process starts
    processes = process_count(trainer_config)
    if ckpt_path:
        model.check_checkpoint(storage.read_checkpoint(ckpt_path), ckpt_path)
    model.check_before(stage, processes)
    data.check_before(stage, processes, bool(trainer_config.get("use_distributed_sampler")))
    if stage == "predict" and getattr(data, "predict_file", None):
        _check_predict_file(model, data)
    folders: list[tuple[str, Any]] = []
    if stage != "predict" or trainer_config.get("logger"):
        folders.append(("trainer.default_root_dir", trainer_config.get("default_root_dir") or os.getcwd()))
    folders += _logger_folders(trainer_config.get("logger"))
    if stage == "fit":
        folders += _callback_folders(trainer_config.get("callbacks"))
    for key, folder in folders:
        if folder:
            writable_folder(folder, key)
    for callback in trainer_config.get("callbacks") or []:
        check = getattr(callback, "check_before", None)
        if callable(check):
            check(stage)
