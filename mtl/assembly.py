"""Building an `MTLModel` from task specs and exported runs: one function for fit, AdapterFusion stage 2 and the
continual-learning runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtl import model_files
from mtl.adapters.config import AdapterConfig
from mtl.data.spec import TaskSpec
from mtl.errors import MTLConfigError
from mtl.fusion.config import FusionConfig, as_fusion_config
from mtl.kinds import kind_of
from mtl.model import MTLModel
from mtl.registry import Part


@dataclass
class FusionSetup:
    """AdapterFusion stage 2: fuse trained adapters for the one target task in ``data.tasks``."""

    name: str = field(metadata={"help": "fusion name: how it is routed and exported (fusions/<name>/)"})
    adapters: list[str] = field(default_factory=list, metadata={"help": "trained adapters to fuse, in order (>= 2)"})
    config: FusionConfig = field(default_factory=FusionConfig, metadata={"help": "fusion settings (type: dynamic | static)"})
    unfreeze_adapters: bool = field(default=False, metadata={"help": "train the fused adapters too and re-export "
                                                                     "them (needs model.overwrite: true)"})

    def __post_init__(self) -> None:
        self.config = as_fusion_config(self.config)


def as_fusion_setup(value: FusionSetup | dict | None) -> FusionSetup | None:
    """Accept a `FusionSetup`, its dict form, or None."""
    if value is None or isinstance(value, FusionSetup):
        return value
    unknown = sorted(set(value) - {"name", "adapters", "config", "unfreeze_adapters"})
    if unknown or "name" not in value:
        raise MTLConfigError(f"model.fusion: keys {sorted(value)}, expected name, adapters, config, unfreeze_adapters")
    return FusionSetup(**value)


def head_outputs(spec: TaskSpec) -> int:
    """Number of head outputs a task needs."""
    return kind_of(spec.problem).head_outputs(spec.labels)


@dataclass
class Assembly:
    """A model ready to train: ``specs`` per data task, ``routes`` data task -> routed task (a fusion for stage 2)."""

    model: MTLModel
    specs: dict[str, TaskSpec]
    routes: dict[str, str]


def _check_head(model: MTLModel, spec: TaskSpec, key: str) -> None:
    """A loaded task's head fits its spec (as many outputs as the spec has labels)."""
    have = model.heads[spec.name].num_outputs
    if have != head_outputs(spec):
        raise MTLConfigError(f"{spec.spec_file}: labels: {head_outputs(spec)} labels, but the adapter of "
                             f"'{spec.name}' loaded for {key} has a head with {have} outputs")


def assemble(tasks: list[TaskSpec], backbone: str, adapter: AdapterConfig, *, backbone_dropout: bool = False,
             head_pooling: str = "mean", head_dropout: float = 0.1, load_from: str | None = None,
             overwrite: bool = False, adapter_sharing: str = "per_task", eval_tasks: list[TaskSpec] = (),
             fusion: FusionSetup | None = None, continue_training: bool = False,
             eval_routes: dict[str, str] | None = None) -> Assembly:
    """Load ``load_from`` (frozen for good), add ``tasks`` (or the fusion for the one target task), mark exactly the
    new parts trainable, and check ``eval_tasks`` against what was loaded.

    With ``continue_training``, a task of ``tasks`` that ``load_from`` already has keeps training from its loaded
    adapter and head (a shared adapter included) instead of being refused; the continual runner builds every
    stage this way from the previous stage's export. ``eval_routes`` evaluates a task of ``eval_tasks`` through a
    loaded fusion instead of its own adapter and head (task -> fusion name).
    """
    if adapter_sharing not in ("per_task", "shared"):
        raise MTLConfigError(f"model.adapter_sharing: '{adapter_sharing}', expected per_task or shared")
    if not tasks and not load_from:
        raise MTLConfigError("model.tasks: empty, expected at least one task name (or model.load_from)")
    model = MTLModel(backbone, backbone_dropout=backbone_dropout)
    keep_training: set[Part] = set()
    if fusion is not None:
        if len(tasks) != 1:
            raise MTLConfigError(f"model.fusion: expects exactly one target task in data.tasks, got {[s.name for s in tasks]}")
        if not load_from:
            raise MTLConfigError("model.fusion: needs model.load_from, the run folder with the trained adapters")
        if fusion.unfreeze_adapters:
            if not overwrite:
                raise MTLConfigError("model.fusion.unfreeze_adapters: rewrites the fused adapters' files, "
                                     "set model.overwrite: true to allow it")
            keep_training = {("adapter", a) for a in fusion.adapters}
    if continue_training and fusion is not None:
        raise MTLConfigError("model.continue_training: not available with model.fusion")
    if load_from:
        loaded = model_files.load_run(model, load_from, same_backbone=True)
        if continue_training:
            keep_training |= {part for s in tasks if s.name in loaded for part in model.records[s.name].parts}
        for name in loaded:
            for part in model.records[name].parts:
                if part not in keep_training and not model.states[part].frozen:
                    model.freeze(part)
    specs, routes = {}, {}
    for spec in tasks:
        specs[spec.name] = spec
        if fusion is not None:
            routes[spec.name] = fusion.name
            if fusion.name in model.tasks and not overwrite:
                raise MTLConfigError(f"model.fusion.name: '{fusion.name}' already exists in {load_from} "
                                     f"(set model.overwrite: true to train it again)")
            model.add_fusion(fusion.name, fusion.adapters, head_outputs(spec), fusion.config, problem=spec.problem,
                             pooling=head_pooling, head_dropout=head_dropout, labels=spec.labels, spec=spec.to_dict(), overwrite=True)
            continue
        routes[spec.name] = spec.name
        if spec.name in model.tasks and continue_training:
            _check_head(model, spec, "data.tasks")
            continue
        if spec.name in model.tasks and not overwrite:
            raise MTLConfigError(f"task '{spec.name}' is already trained in {load_from} "
                                 f"(set model.overwrite: true to train it again from scratch)")
        model.add_task(spec.name, head_outputs(spec), adapter, problem=spec.problem, pooling=head_pooling,
                       head_dropout=head_dropout, labels=spec.labels, spec=spec.to_dict(), overwrite=True,
                       adapter_name="shared" if adapter_sharing == "shared" else None)
    model.set_trainable(list(routes.values()), parts=sorted(keep_training))
    eval_routes = dict(eval_routes or {})
    for task, route in eval_routes.items():
        if task not in [s.name for s in eval_tasks] or route not in model.tasks or not model.target(route).is_fusion:
            raise MTLConfigError(f"model.eval_routes: {task} -> {route}, expected a task of data.eval_tasks and a "
                                 f"fusion loaded from {load_from or 'model.load_from'}")
    for spec in eval_tasks:
        if spec.name not in model.tasks:
            raise MTLConfigError(f"data.eval_tasks: task '{spec.name}' has no trained adapter "
                                 f"(expected it under {load_from or 'model.load_from'}/adapters/)")
        _check_head(model, spec, "data.eval_tasks")
        specs[spec.name] = spec
        routes[spec.name] = eval_routes.get(spec.name, spec.name)
    return Assembly(model, specs, routes)
