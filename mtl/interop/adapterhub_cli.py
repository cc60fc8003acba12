"""``train.py import-adapterhub``: convert AdapterHub folders into an mtl run folder, so the rest of mtl keeps one
loading path (``--model.load_from``).

    train.py import-adapterhub FOLDER [FOLDER ...] --backbone NAME --run_dir DIR [--task NAME] [--num_labels N]

Each FOLDER is an AdapterHub ``save_adapter`` folder (AdapterHub's ``adapter_config.json``: a ``config`` object and a
``name``, no ``format_version``), a ``save_adapter_fusion`` folder (``adapter_fusion_config.json``), or a folder whose
subfolders are such folders (``save_all_adapters`` / ``save_all_adapter_fusions`` write that). Adapters are imported
first, then fusions over them; everything is read and checked before anything is written, then each part is exported
as mtl's own ``DIR/adapters/<task>/`` or ``DIR/fusions/<name>/``. A DIR that already holds an mtl run is loaded first
(same backbone), so a fusion can be converted after its adapters, or beside tasks trained in mtl.

A folder saved without its head (or with a head that does not map onto mtl's) needs ``--num_labels N``: the part is
imported with a fresh, untrained N-label classification head, as ``load_adapterhub(..., num_labels=N)`` does in Python.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtl import model_files
from mtl import storage
from mtl.errors import MTLConfigError
from mtl.interop import adapterhub, adapterhub_fusion

if TYPE_CHECKING:
    from mtl.model import MTLModel


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and exit; mtl reports one line
        raise MTLConfigError(f"import-adapterhub: {' '.join(message.split())}")


def _read_json(file: Path) -> dict[str, Any]:
    data = storage.read_json(file, "an AdapterHub config (JSON)")
    if not isinstance(data, dict):
        raise MTLConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def classify(folder: Path) -> tuple[str, str] | None:
    """("adapter" | "fusion", AdapterHub's name) for an AdapterHub folder, None for a folder with neither config.

    mtl's own export also has an adapter_config.json; its content tells them apart, and it is refused here.
    """
    if (folder / adapterhub_fusion.CONFIG).is_file():
        data = _read_json(folder / adapterhub_fusion.CONFIG)
        return "fusion", str(data.get("name"))
    if not (folder / adapterhub.CONFIG).is_file():
        return None
    data = _read_json(folder / adapterhub.CONFIG)
    if "format_version" in data or "task" in data:
        raise MTLConfigError(f"{folder / adapterhub.CONFIG}: an mtl export, not AdapterHub's; use its run folder with "
                             "--model.load_from as it is")
    if not isinstance(data.get("config"), dict) or not isinstance(data.get("name"), str):
        raise MTLConfigError(f"{folder / adapterhub.CONFIG}: neither AdapterHub's adapter config (a 'config' object "
                             "and a 'name') nor mtl's (format_version)")
    return "adapter", data["name"]


def find_folders(folders: list[str]) -> list[tuple[Path, str, str]]:
    """(folder, kind, AdapterHub name) of every AdapterHub folder given, directly or one level down."""
    found = []
    for given in map(Path, folders):
        if not given.is_dir():
            raise MTLConfigError(f"{given}: not a folder, expected an AdapterHub adapter or fusion folder")
        kind = classify(given)
        if kind is not None:
            found.append((given, *kind))
            continue
        subfolders = sorted(p for p in given.iterdir() if p.is_dir() and not p.name.startswith("."))
        kinds = [(sub, classify(sub)) for sub in subfolders]
        stray = [sub.name for sub, k in kinds if k is None]
        if not subfolders or stray:
            detail = f" (subfolder {stray[0]} has neither)" if stray else ""
            raise MTLConfigError(f"{given}: no {adapterhub.CONFIG} or {adapterhub_fusion.CONFIG}{detail}; expected "
                                 "an AdapterHub save_adapter / save_adapter_fusion folder, or a folder of them")
        found += [(sub, *k) for sub, k in kinds]
    return found


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}, expected a positive integer (the number of labels)")
    return value


def has_usable_head(model: MTLModel, folder: Path, kind: str) -> bool:
    """Whether the folder holds a head mtl can load (else --num_labels gave the part a fresh one)."""
    try:
        adapterhub.resolve_head(model, folder, None, None, kind)
    except adapterhub.HeadNotUsable:
        return False
    return True


def import_main(argv: list[str]) -> list[str]:
    """Parse ``argv`` (after ``import-adapterhub``), convert, export; returns the imported task and fusion names."""
    from mtl.model import MTLModel

    parser = _Parser(prog="train.py import-adapterhub", exit_on_error=False, allow_abbrev=False,
                     description="Convert AdapterHub adapter / fusion folders into an mtl run folder.")
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="AdapterHub folders (or folders of them)")
    parser.add_argument("--backbone", required=True, help="the backbone the adapters were trained on, as given to "
                                                          "train.py --model.backbone later")
    parser.add_argument("--run_dir", required=True, help="the mtl run folder to write (or add to)")
    parser.add_argument("--task", help="the mtl name of the one adapter or fusion imported (default: AdapterHub's "
                                       "name, a fusion's with ',' as '_')")
    parser.add_argument("--num_labels", type=_positive_int, metavar="N",
                        help="a folder without a head mtl can load gets a fresh, untrained N-label classification "
                             "head (one with a head must have N labels)")
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise MTLConfigError(f"import-adapterhub: {' '.join(str(err).split())}") from None
    found = find_folders(args.folders)
    if args.task is not None and len(found) != 1:
        raise MTLConfigError(f"import-adapterhub: --task names one imported part, but {len(found)} folders were "
                             f"found ({', '.join(str(f) for f, _, _ in found)})")
    run = Path(args.run_dir)
    if run.exists() and not run.is_dir():
        raise MTLConfigError(f"{run}: --run_dir exists and is not a folder")
    model = MTLModel(args.backbone)
    if (run / "adapters").is_dir():
        model_files.load_run(model, run, same_backbone=True)
    names, fresh = [], []
    for folder, kind, name in sorted(found, key=lambda f: f[1] == "fusion"):  # a fusion needs its adapters
        task = args.task or (name.replace(",", "_") if kind == "fusion" else name)
        if task in model.tasks:
            where = f"{run} already has it" if task not in names else "another folder given imports it too"
            raise MTLConfigError(f"{folder}: task '{task}' exists ({where}); convert it with --task NEWNAME")
        try:
            load = adapterhub_fusion.load_adapterhub_fusion if kind == "fusion" else adapterhub.load_adapterhub
            names.append(load(model, folder, task, num_labels=args.num_labels))
            if args.num_labels is not None and not has_usable_head(model, folder, kind):
                fresh.append(task)
        except adapterhub.HeadNotUsable as err:  # raised without num_labels only: the advice names the CLI's option
            saved = " (saved without its head)" if not (folder / adapterhub.HEAD_CONFIG).is_file() else ""
            raise MTLConfigError(f"{err.problem}{saved}; pass --num_labels N to import the {kind} with a fresh, "
                                 "untrained N-label classification head") from None
        except MTLConfigError as err:  # name the folder when the model's own check did not
            raise MTLConfigError(str(err) if str(folder) in str(err) else f"{folder}: {err}") from None
    targets = [run / ("fusions" if model.target(n).is_fusion else "adapters") / n for n in names]
    taken = [t for t in targets if t.exists()]
    if taken:  # everything is checked: from here on only writing
        raise MTLConfigError(f"{taken[0]}: already exists (a folder mtl did not load as a task); remove it or choose "
                             "another --run_dir")
    for name, target in zip(names, targets):
        if model.target(name).is_fusion:
            model_files.save_fusion(model, name, run)
        else:
            model_files.save_task(model, name, run / "adapters")
        print(f"{'fusion' if model.target(name).is_fusion else 'task'} '{name}' -> {target}")
    if fresh:  # predicting through an untrained head would answer at random
        heads = f"the head of {fresh[0]} is" if len(fresh) == 1 else f"the heads of {', '.join(fresh)} are"
        print(f"{heads} fresh and untrained; train first with: train.py fit --model.backbone {args.backbone} "
              f"--model.load_from {run} --model.run_dir {run} --model.overwrite true --model.continue_training true "
              f"--data.tasks [{','.join(fresh)}] --data.tasks_dir DIR ...")
    else:
        print(f"use it with: train.py predict --model.backbone {args.backbone} --model.load_from {run} ...")
    return names
