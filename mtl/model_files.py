"""The model's side of files: turning tasks and fusions into tensors + plain dicts for `mtl.storage`, and back.

`mtl.storage` reads and writes folders and never sees the model; this mixin of `MTLModel` is the one place
that maps between the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl import storage
from mtl.adapters.config import AdapterConfig
from mtl.atomic import write_dir_atomic
from mtl.errors import MTLConfigError
from mtl.fusion.config import FusionConfig
from mtl.interop import adapterhub, adapterhub_fusion
from mtl.routing import ROUTER_CONFIG, load_router

if TYPE_CHECKING:
    from mtl.model import MTLModel


class ModelFiles:
    """Export and load tasks (``adapters/<task>/``) and fusions (``fusions/<name>/``) of an `MTLModel`."""

    def backbone_info(self: MTLModel) -> dict[str, Any]:
        """What an exported part records about the backbone it was trained on."""
        config = self.backbone.config
        return {"backbone": self.backbone_name, "model_type": config.model_type, "hidden_size": config.hidden_size,
                "num_layers": self.num_layers}

    def _task_config(self: MTLModel, name: str) -> dict[str, Any]:
        record = self.records[name]
        return {**self.backbone_info(), "head": self.heads[name].settings(), "labels": record.labels,
                "task_spec": record.spec}

    def save_task(self: MTLModel, name: str, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``directory/<name>/`` (adapter.safetensors + adapter_config.json) atomically."""
        self._check_tasks([name])
        target = self.records[name].target
        if target.is_fusion:
            raise MTLConfigError(f"'{name}' is a fusion; export it with save_fusion(name, run_dir)")
        config = {"task": name, "adapter": self.adapter_configs[target.name].to_dict(), "adapter_name": target.name,
                  **self._task_config(name)}
        return storage.write_part(Path(directory) / name, self.task_parameters(name), config,
                                  storage.ADAPTER_WEIGHTS, storage.ADAPTER_CONFIG, overwrite)

    def save_fusion(self: MTLModel, name: str, run_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``run_dir/fusions/<name>/`` with the fusion layers, the target head and each fused adapter's hash.

        The fused adapters must already be exported under ``run_dir/adapters/``: the fusion is only valid with
        exactly those files, and loading checks their SHA-256.
        """
        self._check_tasks([name])
        target = self.records[name].target
        if not target.is_fusion:
            raise MTLConfigError(f"'{name}' is not a fusion; export it with save_task")
        adapters = []
        for adapter in target.fused:
            owner = next(t for t, r in self.records.items() if r.target.name == adapter and not r.target.is_fusion)
            file = Path("adapters") / owner / storage.ADAPTER_WEIGHTS
            if not (Path(run_dir) / file).is_file():
                raise MTLConfigError(f"{Path(run_dir) / file}: not found; fusion '{name}' needs its adapters exported "
                                     f"in the same run folder")
            adapters.append({"name": adapter, "file": str(file), "sha256": storage.file_sha256(Path(run_dir) / file)})
        config = {"fusion": name, "adapters": adapters, "fusion_config": self.fusion_configs[name].to_dict(),
                  **self._task_config(name)}
        return storage.write_part(Path(run_dir) / "fusions" / name, self.task_parameters(name), config,
                                  storage.FUSION_WEIGHTS, storage.FUSION_CONFIG, overwrite)

    def _fill(self: MTLModel, name: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
        """Copy a file's tensors into a freshly added task (removed again if they do not fit)."""
        params = self.task_parameters(name)
        try:
            storage.check_tensors(file, tensors, {k: p.shape for k, p in params.items()})
        except MTLConfigError:
            self.remove_task(name)
            raise
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(tensors[key])

    def load_task(self: MTLModel, path: str | Path, overwrite: bool = False, name: str | None = None,
                  same_backbone: bool = False) -> str:
        """Add the task exported in ``path`` to this model; returns its name."""
        path = Path(path)
        data = storage.read_config(path, storage.ADAPTER_CONFIG, storage.ADAPTER_SCHEMA)
        storage.check_backbone(data, self.backbone_info(), path / storage.ADAPTER_CONFIG, same_backbone)
        name = name or data["task"]
        weights = path / storage.ADAPTER_WEIGHTS
        tensors = storage.read_tensors(weights)
        adapter_name = data.get("adapter_name") or name
        shared = adapter_name in self.adapter_configs
        if shared:  # the adapter is already loaded for another task: this file's copy must be the same tensors
            have = self.part_parameters(("adapter", adapter_name))
            differ = [k for k, p in have.items() if k in tensors and not torch.equal(tensors[k], p.detach().cpu())]
            if differ:
                raise MTLConfigError(f"{weights}: shared adapter '{adapter_name}' differs from the one already loaded "
                                     f"({differ[0]})")
        head = data["head"]
        self.add_task(name, head["num_outputs"], AdapterConfig.from_dict(data["adapter"], str(path / storage.ADAPTER_CONFIG)),
                      problem=head["problem"], pooling=head["pooling"], head_dropout=head["dropout"],
                      labels=data.get("labels"), spec=data.get("task_spec"), overwrite=overwrite,
                      adapter_name=adapter_name if adapter_name != name else None)
        self._fill(name, tensors, weights)
        return name

    def load_fusion(self: MTLModel, path: str | Path, overwrite: bool = False, same_backbone: bool = False) -> str:
        """Add the fusion exported in ``path`` (its adapters must be loaded, from files with the recorded hashes)."""
        path = Path(path)
        source = path / storage.FUSION_CONFIG
        data = storage.read_config(path, storage.FUSION_CONFIG, storage.FUSION_SCHEMA)
        storage.check_backbone(data, self.backbone_info(), source, same_backbone)
        run_dir = path.parent.parent
        names = []
        for entry in data["adapters"]:
            file = run_dir / entry["file"]
            if not file.is_file():
                raise MTLConfigError(f"{source}: fused adapter '{entry['name']}' is missing ({file} not found)")
            if storage.file_sha256(file) != entry["sha256"]:
                raise MTLConfigError(f"{source}: fused adapter '{entry['name']}' changed since the fusion was trained "
                                     f"({file} has another SHA-256)")
            if entry["name"] not in self.adapter_configs:
                raise MTLConfigError(f"{source}: fused adapter '{entry['name']}' is not loaded (load {file.parent} first)")
            names.append(entry["name"])
        head = data["head"]
        config = FusionConfig.from_dict(data["fusion_config"], str(source))
        self.add_fusion(data["fusion"], names, head["num_outputs"], config, problem=head["problem"],
                        pooling=head["pooling"], head_dropout=head["dropout"], labels=data.get("labels"),
                        spec=data.get("task_spec"), overwrite=overwrite)
        self._fill(data["fusion"], storage.read_tensors(path / storage.FUSION_WEIGHTS), path / storage.FUSION_WEIGHTS)
        return data["fusion"]

    def load_run(self: MTLModel, checkpoint_dir: str | Path, same_backbone: bool = False) -> list[str]:
        """Load every task and fusion exported under ``checkpoint_dir``; returns their names."""
        names = [self.load_task(d, same_backbone=same_backbone) for d in storage.task_dirs(checkpoint_dir)]
        names += [self.load_fusion(d, same_backbone=same_backbone) for d in storage.fusion_dirs(checkpoint_dir)]
        return names

    def load_adapterhub(self: MTLModel, folder: str | Path, task: str | None = None, **kwargs: Any) -> str:
        """Add a task from a folder written by AdapterHub's save_adapter (see `mtl.interop.adapterhub`)."""
        return adapterhub.load_adapterhub(self, folder, task, **kwargs)

    def save_adapterhub(self: MTLModel, task: str, folder: str | Path, **kwargs: Any) -> Path:
        """Write a task's adapter (and head) in AdapterHub's save_adapter layout (see `mtl.interop.adapterhub`)."""
        return adapterhub.save_adapterhub(self, task, folder, **kwargs)

    def load_adapterhub_fusion(self: MTLModel, folder: str | Path, task: str | None = None, **kwargs: Any) -> str:
        """Add a fusion from a folder written by AdapterHub's save_adapter_fusion (see `mtl.interop.adapterhub_fusion`)."""
        return adapterhub_fusion.load_adapterhub_fusion(self, folder, task, **kwargs)

    def save_adapterhub_fusion(self: MTLModel, fusion: str, folder: str | Path, **kwargs: Any) -> Path:
        """Write a fusion (and head) in AdapterHub's save_adapter_fusion layout (see `mtl.interop.adapterhub_fusion`)."""
        return adapterhub_fusion.save_adapterhub_fusion(self, fusion, folder, **kwargs)

    def save_pretrained(self: MTLModel, folder: str | Path, overwrite: bool = False) -> Path:
        """Every task (adapter, head, spec), every fusion and the router, if set, in one folder written atomically."""
        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise MTLConfigError(f"{folder}: already exists (pass overwrite=True to replace it)")
        if self.router is not None:
            missing = [t for t in self.router.tasks if t not in self.records]
            if missing:
                raise MTLConfigError(f"model.router routes to {missing}, which the model does not have")

        def fill(tmp: Path) -> None:
            fusions = [t for t in self.tasks if self.target(t).is_fusion]
            for task in self.tasks:
                if task not in fusions:
                    self.save_task(task, tmp / "adapters")
            for fusion in fusions:  # after the adapters: a fusion's file records their hashes
                self.save_fusion(fusion, tmp)
            if self.router is not None and self.router.tasks:
                self.router.save(tmp / "router")

        return write_dir_atomic(folder, fill)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, backbone: Any = None) -> MTLModel:
        """Backbone + every task and fusion exported under ``checkpoint_dir``, and its router (``router/``) if any."""
        if backbone is None:
            dirs = storage.task_dirs(checkpoint_dir)
            names = {storage.read_config(d, storage.ADAPTER_CONFIG, storage.ADAPTER_SCHEMA).get("backbone") for d in dirs}
            if len(names) != 1:
                raise MTLConfigError(f"{checkpoint_dir}: tasks were trained on different backbones {sorted(map(str, names))}")
            backbone = names.pop()
        model = cls(backbone)
        model.load_run(checkpoint_dir)
        if (Path(checkpoint_dir) / "router" / ROUTER_CONFIG).is_file():
            model.router = load_router(Path(checkpoint_dir) / "router")
            missing = [t for t in model.router.tasks if t not in model.records]
            if missing:
                raise MTLConfigError(f"{Path(checkpoint_dir) / 'router'}: routes to {missing}, which "
                                     f"{checkpoint_dir} has no adapter for")
        return model
