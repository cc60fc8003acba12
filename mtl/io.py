"""Task directories on disk: ``<dir>/<task>/adapter.safetensors`` + ``adapter_config.json``.

Tensor names are stable: ``adapters.<layer>.<attn|ffn>.<down|up>.<weight|bias>`` and
``head.<dense|out>.<weight|bias>``. Writes are atomic (temporary directory beside the target,
fsync, rename); an existing task directory is only replaced when asked. Loading reads
safetensors and JSON only, never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from mtl.adapters.config import AdapterConfig
from mtl.errors import MTLConfigError

if TYPE_CHECKING:
    from mtl.model import MTLModel

FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=2))


def task_config(model: MTLModel, name: str) -> dict[str, Any]:
    """The JSON that describes one exported task."""
    config = model.backbone.config
    meta = model.task_meta[name]
    return {
        "format_version": FORMAT_VERSION,
        "task": name,
        "backbone": model.backbone_name,
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_layers": model.num_layers,
        "adapter": model.adapter_configs[name].to_dict(),
        "adapter_name": model.task_adapter[name],
        "head": meta["head"],
        "labels": meta["labels"],
        "task_spec": meta["spec"],
    }


def save_task(model: MTLModel, name: str, directory: str | Path, overwrite: bool = False) -> Path:
    """Export one task's adapter + head to ``directory/<name>/`` atomically."""
    directory = Path(directory)
    target = directory / name
    if target.exists() and not overwrite:
        raise MTLConfigError(f"{target}: adapter already exists (pass overwrite=True / --overwrite to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().to("cpu").contiguous() for k, p in model.task_parameters(name).items()}
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "task": name})
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        write_json_atomic(tmp / CONFIG, task_config(model, name))
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=directory, prefix=f".{name}.", suffix=".old"))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_task_config(path: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of a task directory."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise MTLConfigError(f"{file}: not found (expected an exported task directory)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise MTLConfigError(f"{file}: invalid JSON ({err})") from None
    missing = [k for k in ("task", "hidden_size", "num_layers", "adapter", "head") if k not in data]
    if missing:
        raise MTLConfigError(f"{file}: missing keys {missing}")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise MTLConfigError(f"{file}: format_version {data['format_version']} is newer than this mtl ({FORMAT_VERSION})")
    return data


def check_compatible(model: MTLModel, data: dict[str, Any], source: Path) -> None:
    """Refuse an adapter trained for another backbone shape."""
    config = model.backbone.config
    for key, have in (("hidden_size", config.hidden_size), ("num_layers", model.num_layers),
                      ("model_type", config.model_type)):
        want = data.get(key)
        if want is not None and want != have:
            raise MTLConfigError(f"{source / CONFIG}: {key} is {want!r} but the backbone has {have!r} "
                                 f"(adapter trained for backbone '{data.get('backbone')}')")


def load_task(model: MTLModel, path: str | Path, overwrite: bool = False, name: str | None = None) -> str:
    """Add the task stored in ``path`` to ``model``; returns its name."""
    path = Path(path)
    data = read_task_config(path)
    check_compatible(model, data, path)
    name = name or data["task"]
    head = data["head"]
    weights = path / WEIGHTS
    if not weights.is_file():
        raise MTLConfigError(f"{weights}: not found")
    tensors = load_file(str(weights))
    adapter_name = data.get("adapter_name") or name
    shared = adapter_name in model.task_adapter.values()
    model.add_task(name, head["num_outputs"], AdapterConfig.from_dict(data["adapter"], str(path / CONFIG)),
                   problem=head["problem"], pooling=head["pooling"], head_dropout=head["dropout"],
                   labels=data.get("labels"), spec=data.get("task_spec"), overwrite=overwrite,
                   adapter_name=adapter_name if adapter_name != name else None)
    params = model.task_parameters(name)
    if shared:  # the adapter is already loaded for another task: this file's copy must be the same tensors
        differ = [k for k, p in params.items() if k.startswith("adapters.") and k in tensors
                  and not torch.equal(tensors[k], p.detach().cpu())]
        if differ:
            model.remove_task(name)
            raise MTLConfigError(f"{weights}: shared adapter '{adapter_name}' differs from the one already loaded "
                                 f"({differ[0]})")
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        model.remove_task(name)
        raise MTLConfigError(f"{weights}: tensors do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, p in params.items():
            if tensors[key].shape != p.shape:
                model.remove_task(name)
                raise MTLConfigError(f"{weights}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[key])
    return name


def task_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """Exported task directories under ``checkpoint_dir/adapters`` (or ``checkpoint_dir`` itself)."""
    root = Path(checkpoint_dir)
    base = root / "adapters" if (root / "adapters").is_dir() else root
    dirs = sorted(p for p in base.iterdir() if (p / CONFIG).is_file()) if base.is_dir() else []
    if not dirs:
        raise MTLConfigError(f"{checkpoint_dir}: no exported tasks found (expected adapters/<task>/{CONFIG})")
    return dirs


def load_model(cls: type[MTLModel], checkpoint_dir: str | Path, backbone=None) -> MTLModel:
    """Build the backbone named by the exported tasks and load all of them."""
    dirs = task_dirs(checkpoint_dir)
    configs = [read_task_config(d) for d in dirs]
    names = {c.get("backbone") for c in configs}
    if backbone is None:
        if len(names) != 1:
            raise MTLConfigError(f"{checkpoint_dir}: tasks were trained on different backbones {sorted(map(str, names))}")
        backbone = names.pop()
    model = cls(backbone)
    for d in dirs:
        load_task(model, d)
    return model
