"""The model's side of files: turning tasks and fusions into tensors + plain dicts for `mtl.storage`, and back.

`mtl.storage` reads and writes folders and never sees the model; these functions take the model as an argument and
are the one place that maps between the two. The model itself knows no files (its `from_pretrained` /
`save_pretrained` hand the work to this module).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl import storage
from mtl.adapters.config import AdapterConfig
from mtl.atomic import write_dir_atomic
from mtl.errors import MTLConfigError
from mtl.fusion.config import FusionConfig

if TYPE_CHECKING:
    from mtl.model import MTLModel
    from mtl.part_pool import PartPool


def backbone_info(model: MTLModel) -> dict[str, Any]:
    """What an exported part records about the backbone it was trained on."""
    config = model.backbone.config
    return {"backbone": model.backbone_name, "model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_layers": model.num_layers}


def _task_config(model: MTLModel, name: str) -> dict[str, Any]:
    record = model.records[name]
    return {**backbone_info(model), "head": model.heads[name].settings(), "labels": record.labels,
            "task_spec": record.spec}


def save_task(model: MTLModel, name: str, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``directory/<name>/`` (adapter.safetensors + adapter_config.json) atomically."""
    model._check_tasks([name])
    target = model.records[name].target
    if target.is_fusion:
        raise MTLConfigError(f"'{name}' is a fusion; export it with save_fusion(model, name, run_dir)")
    config = {"task": name, "adapter": model.adapter_configs[target.name].to_dict(), "adapter_name": target.name,
              **_task_config(model, name)}
    return storage.write_part(Path(directory) / name, model.task_parameters(name), config,
                              storage.ADAPTER_WEIGHTS, storage.ADAPTER_CONFIG, overwrite)


def fusions_fusing(run_dir: str | Path, task: str) -> list[str]:
    """The fusions exported under ``run_dir/fusions/`` whose recorded adapter files include ``adapters/<task>/``."""
    file = str(Path("adapters") / task / storage.ADAPTER_WEIGHTS)
    return [folder.name for folder in storage.fusion_dirs(run_dir)
            if any(a["file"] == file for a in storage.read_config(folder, storage.FUSION_CONFIG,
                                                                   storage.FUSION_SCHEMA)["adapters"])]


def check_replaceable(run_dir: str | Path, task: str, replaced_fusions: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse to replace ``run_dir/adapters/<task>/`` while a fusion there (other than ``replaced_fusions``, exported
    again with it) fuses it: that fusion records the file's SHA-256 and would never load again."""
    dependent = [f for f in fusions_fusing(run_dir, task) if f not in replaced_fusions]
    if dependent:
        folders = ", ".join(str(Path(run_dir) / "fusions" / f) for f in dependent)
        raise MTLConfigError(
            f"{Path(run_dir) / 'adapters' / task}: fused by fusion(s) {dependent} in the same run folder, which record "
            "this adapter file's SHA-256 and would no longer load if it were replaced; to proceed, train into a new "
            f"run folder (model.run_dir, with model.load_from {run_dir}), or remove the fusion(s) first ({folders})")


def save_fusion(model: MTLModel, name: str, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``run_dir/fusions/<name>/`` with the fusion layers, the target head and each fused adapter's hash.

    The fused adapters must already be exported under ``run_dir/adapters/``: the fusion is only valid with
    exactly those files, and loading checks their SHA-256.
    """
    model._check_tasks([name])
    target = model.records[name].target
    if not target.is_fusion:
        raise MTLConfigError(f"'{name}' is not a fusion; export it with save_task(model, name, directory)")
    adapters = []
    for adapter in target.fused:
        owner = next(t for t, r in model.records.items() if r.target.name == adapter and not r.target.is_fusion)
        file = Path("adapters") / owner / storage.ADAPTER_WEIGHTS
        if not (Path(run_dir) / file).is_file():
            raise MTLConfigError(f"{Path(run_dir) / file}: not found; fusion '{name}' needs its adapters exported "
                                 f"in the same run folder")
        adapters.append({"name": adapter, "file": str(file), "sha256": storage.file_sha256(Path(run_dir) / file)})
    config = {"fusion": name, "adapters": adapters, "fusion_config": model.fusion_configs[name].to_dict(),
              **_task_config(model, name)}
    return storage.write_part(Path(run_dir) / "fusions" / name, model.task_parameters(name), config,
                              storage.FUSION_WEIGHTS, storage.FUSION_CONFIG, overwrite)


def _fill(model: MTLModel, name: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Copy a file's tensors into a freshly added task (removed again if they do not fit)."""
    params = model.task_parameters(name)
    try:
        storage.check_tensors(file, tensors, {k: p.shape for k, p in params.items()})
    except MTLConfigError:
        model.remove_task(name)
        raise
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])


def load_task(model: MTLModel, path: str | Path, overwrite: bool = False, name: str | None = None,
              same_backbone: bool = False, data: dict[str, Any] | None = None,
              tensors: dict[str, torch.Tensor] | None = None, pool: PartPool | None = None) -> str:
    """Add the task exported in ``path`` to this model; returns its name.

    ``data`` / ``tensors``: the folder's config and weights when the caller has read them already (a server reads
    the weights' bytes once, for their SHA-256 and for the tensors, so the version it reports is what it loaded).
    ``pool``: reuse removed tasks' modules of the same shapes (every parameter is filled from the file).
    """
    path = Path(path)
    if data is None:
        data = storage.read_config(path, storage.ADAPTER_CONFIG, storage.ADAPTER_SCHEMA)
    storage.check_backbone(data, backbone_info(model), path / storage.ADAPTER_CONFIG, same_backbone)
    name = name or data["task"]
    weights = path / storage.ADAPTER_WEIGHTS
    tensors = storage.read_tensors(weights) if tensors is None else tensors
    adapter_name = data.get("adapter_name") or name
    shared = adapter_name in model.adapter_configs
    if shared:  # the adapter is already loaded for another task: this file's copy must be the same tensors
        have = model.part_parameters(("adapter", adapter_name))
        differ = [k for k, p in have.items() if k in tensors and not torch.equal(tensors[k], p.detach().cpu())]
        if differ:
            raise MTLConfigError(f"{weights}: shared adapter '{adapter_name}' differs from the one already loaded "
                                 f"({differ[0]})")
    head = data["head"]
    model.add_task(name, head["num_outputs"], AdapterConfig.from_dict(data["adapter"], str(path / storage.ADAPTER_CONFIG)),
                  problem=head["problem"], pooling=head["pooling"], head_dropout=head["dropout"],
                  labels=data.get("labels"), spec=data.get("task_spec"), overwrite=overwrite,
                  adapter_name=adapter_name if adapter_name != name else None, pool=pool)
    _fill(model, name, tensors, weights)
    return name


def load_fusion(model: MTLModel, path: str | Path, overwrite: bool = False, same_backbone: bool = False,
                data: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Add the fusion exported in ``path`` (its adapters must be loaded, from files with the recorded hashes);
    ``data`` / ``tensors`` as in `load_task`."""
    path = Path(path)
    source = path / storage.FUSION_CONFIG
    if data is None:
        data = storage.read_config(path, storage.FUSION_CONFIG, storage.FUSION_SCHEMA)
    storage.check_backbone(data, backbone_info(model), source, same_backbone)
    run_dir = path.parent.parent
    names = []
    for entry in data["adapters"]:
        file = run_dir / entry["file"]
        if not file.is_file():
            raise MTLConfigError(f"{source}: fused adapter '{entry['name']}' is missing ({file} not found)")
        if storage.file_sha256(file) != entry["sha256"]:
            raise MTLConfigError(f"{source}: fused adapter '{entry['name']}' changed since the fusion was trained "
                                 f"({file} has another SHA-256)")
        if entry["name"] not in model.adapter_configs:
            raise MTLConfigError(f"{source}: fused adapter '{entry['name']}' is not loaded (load {file.parent} first)")
        names.append(entry["name"])
    head = data["head"]
    config = FusionConfig.from_dict(data["fusion_config"], str(source))
    model.add_fusion(data["fusion"], names, head["num_outputs"], config, problem=head["problem"],
                    pooling=head["pooling"], head_dropout=head["dropout"], labels=data.get("labels"),
                    spec=data.get("task_spec"), overwrite=overwrite)
    weights = path / storage.FUSION_WEIGHTS
    _fill(model, data["fusion"], storage.read_tensors(weights) if tensors is None else tensors, weights)
    return data["fusion"]


def load_run(model: MTLModel, checkpoint_dir: str | Path, same_backbone: bool = False) -> list[str]:
    """Load every task and fusion exported under ``checkpoint_dir``; returns their names."""
    names = [load_task(model, d, same_backbone=same_backbone) for d in storage.task_dirs(checkpoint_dir)]
    names += [load_fusion(model, d, same_backbone=same_backbone) for d in storage.fusion_dirs(checkpoint_dir)]
    return names


def save_pretrained(model: MTLModel, folder: str | Path, overwrite: bool = False,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Every task (adapter, head, spec) and every fusion in one folder written atomically; ``extra(tmp)`` adds more
    files (a router) to the same atomic write."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise MTLConfigError(f"{folder}: already exists (pass overwrite=True to replace it)")

    def fill(tmp: Path) -> None:
        fusions = [t for t in model.tasks if model.target(t).is_fusion]
        for task in model.tasks:
            if task not in fusions:
                save_task(model, task, tmp / "adapters")
        for fusion in fusions:  # after the adapters: a fusion's file records their hashes
            save_fusion(model, fusion, tmp)
        if extra is not None:
            extra(tmp)

    return write_dir_atomic(folder, fill)


def run_backbone(checkpoint_dir: str | Path) -> str:
    """The one backbone name every task exported under ``checkpoint_dir`` was trained on."""
    dirs = storage.task_dirs(checkpoint_dir)
    names = {storage.read_config(d, storage.ADAPTER_CONFIG, storage.ADAPTER_SCHEMA).get("backbone") for d in dirs}
    if len(names) != 1:
        raise MTLConfigError(f"{checkpoint_dir}: tasks were trained on different backbones {sorted(map(str, names))}")
    return names.pop()
