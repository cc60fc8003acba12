"""AdapterHub `adapters` 1.3 AdapterFusion folders, both ways (the plain adapters: `mtl.interop.adapterhub`).

AdapterHub's ``save_adapter_fusion(folder, "a,b", with_head=True, use_safetensors=True)`` writes, in one folder:
``adapter_fusion_config.json`` (name, adapter_names in Fuse order, model_type, hidden_size, version, config: the
AdapterFusionConfig fields), ``model_adapter_fusion.safetensors`` (``<layers>.<l>.<location>.adapter_fusion_layer.
<name>.<query|key|value>.*``, maybe under a model prefix such as ``bert.``) and, with its head, ``head_config.json`` +
``model_head.safetensors`` (``heads.<name>.*``). Without use_safetensors it writes ``pytorch_model_adapter_fusion.bin``
(and ``pytorch_model_head.bin``), read here with ``torch.load(weights_only=True)`` only; AdapterHub's default is
``with_head=False``, so such a folder needs ``num_labels`` for a fresh head. The fused adapters are separate
``save_adapter`` folders: load them first (`load_adapterhub`), then the fusion finds them by name.

Field mapping onto `FusionConfig` (same names): key and query must be true; ``regularization`` without a value
matrix does nothing in AdapterHub and becomes false; ``dropout_prob`` 0 or null means the backbone's attention dropout
in AdapterHub (``dropout_prob or attention_probs_dropout_prob``), so both become null; ``temperature`` true becomes
mtl's schedule 50 -> 1 over 980 steps (AdapterHub subtracts 50/1000 per forward call down to 1; mtl counts optimiser
steps and evaluates at 1, while a freshly loaded AdapterHub model starts again at 50). AdapterHub also keeps fusion
layers at locations where none of the fused adapters sits (their ``leave_out`` layers); those are never run, so
their tensors are dropped on import and written as placeholders (zero query / key, identity value) on export.
AdapterHub reads mtl's exports with ``load_adapter_fusion(folder, use_safetensors=True, set_active=True)``; their
tensor names carry the model prefix (``bert.``), as AdapterHub's own saves from a flex-head model do, because its
fusion loader, unlike its adapter loader, does not add it (without it a BertAdapterModel silently loads nothing).
Checked against AdapterHub 1.3.0 on MiniLM both ways by benchmarks/peers/adapterhub_roundtrip.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl import storage
from mtl.arch import ARCHS
from mtl.errors import MTLConfigError, warn
from mtl.fusion.config import FusionConfig
from mtl.interop.adapterhub import (LOCATIONS, _backbone, _is_number, _read_weights, copy_into, export_meta,
                                    head_file, head_problem, other_part, resolve_head, write_folder)

if TYPE_CHECKING:
    from mtl.model import MTLModel

CONFIG, WEIGHTS, LEGACY_WEIGHTS = ("adapter_fusion_config.json", "model_adapter_fusion.safetensors",
                                   "pytorch_model_adapter_fusion.bin")
# AdapterHub's DynamicAdapterFusionConfig / StaticAdapterFusionConfig, as their to_dict() writes them
PRESETS: dict[str, dict[str, Any]] = {
    "dynamic": dict(key=True, query=True, value=True, query_before_ln=False, regularization=True,
                    residual_before=False, temperature=False, value_before_softmax=True, value_initialized=True,
                    dropout_prob=None),
    "static": dict(key=True, query=True, value=False, query_before_ln=False, regularization=False,
                   residual_before=False, temperature=False, value_before_softmax=True, value_initialized=False,
                   dropout_prob=None),
}
_BOOLS = ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
          "value_before_softmax", "value_initialized")
# AdapterHub: T starts at 50 and drops by 50 / 1000 per forward call until 1, i.e. after 980 calls
TEMPERATURE = dict(temperature_start=50.0, temperature_end=1.0, temperature_steps=980)
REG_WEIGHT = 0.01  # hard-coded in AdapterHub's get_fusion_regularization_loss
# base_model_prefix of AdapterHub's <Family>AdapterModel: its load_adapter_fusion matches tensor names against the
# whole model (unlike load_adapter), so an export without this prefix would load nothing into a flex-head model
PREFIXES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra",
            "deberta-v2": "deberta", "distilbert": "distilbert", "modernbert": "model"}


def fusion_config_from_adapterhub(cfg: Any, source: str | Path) -> FusionConfig:
    """mtl's `FusionConfig` for AdapterHub's AdapterFusionConfig (adapter_fusion_config.json's "config")."""
    if isinstance(cfg, str) and cfg in PRESETS:  # a preset name is what add_adapter_fusion accepts as well
        cfg = PRESETS[cfg]
    if not isinstance(cfg, dict):
        raise MTLConfigError(f"{source}: config is {cfg!r:.40}, expected AdapterHub's fusion config (an object, or "
                             f"one of {sorted(PRESETS)})")
    unknown = sorted(set(cfg) - set(PRESETS["dynamic"]))
    if unknown:
        raise MTLConfigError(f"{source}: config has keys mtl does not know {unknown}, expected AdapterFusionConfig "
                             "fields only")
    missing = sorted(set(PRESETS["dynamic"]) - set(cfg))
    if missing:  # AdapterHub's from_dict refuses these too: its dataclass has no defaults
        raise MTLConfigError(f"{source}: config.{missing[0]}: missing (a required AdapterFusionConfig field)")
    for key in _BOOLS:
        if not isinstance(cfg[key], bool):
            raise MTLConfigError(f"{source}: config.{key} is {cfg[key]!r}, expected true or false")
    for key in ("query", "key"):
        if not cfg[key]:
            raise MTLConfigError(f"{source}: config.{key} is false, expected true (mtl's fusion always projects "
                                 "query and key)")
    dropout = cfg["dropout_prob"]
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        raise MTLConfigError(f"{source}: config.dropout_prob is {dropout!r}, expected null or a number in [0, 1)")
    return FusionConfig(type="dynamic" if cfg["value"] else "static", query=True, key=True, value=cfg["value"],
                        value_initialized=cfg["value_initialized"],
                        regularization=cfg["regularization"] and cfg["value"], temperature=cfg["temperature"],
                        residual_before=cfg["residual_before"], value_before_softmax=cfg["value_before_softmax"],
                        query_before_ln=cfg["query_before_ln"], dropout_prob=float(dropout) if dropout else None,
                        reg_weight=REG_WEIGHT, **(TEMPERATURE if cfg["temperature"] else {}))


def fusion_config_to_adapterhub(config: FusionConfig, name: str) -> tuple[dict[str, Any], list[str]]:
    """AdapterHub's AdapterFusionConfig dict, and what AdapterHub will do differently while training (if anything)."""
    if config.temperature and config.temperature_end != 1.0:
        raise MTLConfigError(f"fusion '{name}': temperature_end {config.temperature_end} is not expressible: "
                             "AdapterHub anneals the temperature down to 1")
    differences = []
    if config.regularization and config.reg_weight != REG_WEIGHT:
        differences.append(f"reg_weight {config.reg_weight} (AdapterHub: {REG_WEIGHT})")
    if config.dropout_prob == 0:
        differences.append("dropout_prob 0 (AdapterHub reads 0 as the backbone's attention dropout)")
    if config.temperature:
        differences.append("the temperature schedule (AdapterHub: 50 -> 1 by 0.05 per forward call, restarting at "
                           "50 whenever it loads the fusion, evaluation included)")
    cfg = {key: bool(getattr(config, key)) for key in _BOOLS}
    return {**cfg, "dropout_prob": config.dropout_prob}, differences


def _pattern(model_type: str, name: str) -> re.Pattern[str]:
    attn, ffn = LOCATIONS[model_type]
    return re.compile(rf"^(?:\w+\.)?{re.escape(ARCHS[model_type].layers)}\.(\d+)\.({re.escape(attn)}|"
                      rf"{re.escape(ffn)})\.adapter_fusion_layer\.{re.escape(name)}\.(query|key|value)\."
                      r"(weight|bias)$")


def _ah_key(model_type: str, layer: int, position: str, name: str, proj: str, kind: str, prefix: str = "") -> str:
    attn, ffn = LOCATIONS[model_type]
    return (f"{prefix}{ARCHS[model_type].layers}.{layer}.{attn if position == 'attn' else ffn}.adapter_fusion_layer."
            f"{name}.{proj}.{kind}")


def _expected(locations: Sequence[tuple[int, str]], hidden: int, value: bool) -> dict[str, torch.Size]:
    """mtl's fusion tensor names and shapes at these locations."""
    parts = {"query.weight": (hidden, hidden), "query.bias": (hidden,), "key.weight": (hidden, hidden),
             "key.bias": (hidden,), **({"value.weight": (hidden, hidden)} if value else {})}
    return {f"fusions.{layer}.{position}.{key}": torch.Size(shape) for layer, position in locations
            for key, shape in parts.items()}


def load_adapterhub_fusion(model: MTLModel, folder: str | Path, task: str | None = None,
                           adapters: Sequence[str] | None = None, num_labels: int | None = None,
                           labels: Sequence[str] | None = None, overwrite: bool = False) -> str:
    """Add the fusion (and head) of a folder written by AdapterHub's save_adapter_fusion to ``model``; returns its name.

    The fused adapters must be loaded already, under AdapterHub's names or under ``adapters`` (mtl adapter names in
    AdapterHub's order). ``task`` defaults to AdapterHub's fusion name with ',' as '_' ('a,b' -> 'a_b').
    """
    folder = Path(folder)
    file = folder / CONFIG
    data = storage.read_config(folder, CONFIG, {})  # a JSON object; its fields are checked below
    info = _backbone(model)
    for key in ("model_type", "hidden_size"):
        if data.get(key) is not None and data[key] != info[key]:
            raise MTLConfigError(f"{file}: {key} is {data[key]!r} but the backbone has {info[key]!r}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise MTLConfigError(f"{file}: name is {name!r}, expected the fusion's name")
    names = data.get("adapter_names", name.split(","))  # AdapterHub's loader falls back on the name as well
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise MTLConfigError(f"{file}: adapter_names is {names!r:.60}, expected the fused adapters' names")
    config = fusion_config_from_adapterhub(data.get("config"), file)
    fused = list(adapters) if adapters is not None else names
    if len(fused) != len(names):
        raise MTLConfigError(f"adapters: {len(fused)} names for the {len(names)} adapters {names} of {file}")
    missing = [a for a in fused if a not in model.adapter_configs]
    if missing:
        raise MTLConfigError(f"{file}: adapter_names: {missing} not loaded in the model (load their AdapterHub "
                             f"folders with load_adapterhub first, or map the names with adapters=); loaded: "
                             f"{sorted(model.adapter_configs)}")
    locations = {tuple(model.adapter_locations(a)) for a in fused}
    if len(locations) > 1:
        raise MTLConfigError(f"{file}: adapter_names: {fused} sit at different layers or positions; mtl fuses "
                             "adapters with the same leave_out and positions only")
    where = list(locations.pop())
    weights, wfile = _read_weights(folder, WEIGHTS, LEGACY_WEIGHTS)
    pattern, tensors = _pattern(info["model_type"], name), {}
    positions = {position for _, position in where}
    for key, tensor in weights.items():
        if other_part(key, "adapter_fusion_layer", name):
            continue
        match = pattern.match(key)
        if match is None:
            raise MTLConfigError(f"{wfile}: tensor '{key}' is not a tensor of fusion '{name}', expected names like "
                                 f"'{_ah_key(info['model_type'], 0, 'ffn', name, 'query', 'weight')}'")
        layer, location, proj, kind = int(match[1]), match[2], match[3], match[4]
        position = "attn" if location == LOCATIONS[info["model_type"]][0] else "ffn"
        if (layer, position) not in where and layer < info["num_layers"] and position in positions:
            continue  # a fusion layer where no fused adapter sits: AdapterHub never runs it
        if f"fusions.{layer}.{position}.{proj}.{kind}" in tensors:
            raise MTLConfigError(f"{wfile}: tensor '{key}' appears twice (with and without a model prefix)")
        tensors[f"fusions.{layer}.{position}.{proj}.{kind}"] = tensor
    storage.check_tensors(wfile, tensors, _expected(where, info["hidden_size"], bool(config.value)))
    head = resolve_head(model, folder, num_labels, labels, "fusion")
    task = task or name.replace(",", "_")
    try:  # add_fusion checks everything (name, adapter rules, overwrite) before it changes the model
        model.add_fusion(task, fused, head["num_outputs"], config, problem=head["problem"], pooling="cls",
                         head_dropout=head["dropout"], labels=head["labels"], overwrite=overwrite)
    except MTLConfigError as err:
        raise MTLConfigError(f"{file}: {err}") from None
    copy_into(model.task_parameters(task), {**tensors, **head["tensors"]})
    return task


def save_adapterhub_fusion(model: MTLModel, fusion: str, folder: str | Path, overwrite: bool = False,
                           with_head: bool | None = None) -> Path:
    """Write ``folder`` in AdapterHub's save_adapter_fusion layout; AdapterHub: load_adapter_fusion(folder,
    use_safetensors=True). The fused adapters are exported with save_adapterhub (under their tasks' names).

    ``with_head`` as in `save_adapterhub`. Settings AdapterHub handles its own way (reg_weight, a dropout_prob of 0,
    the temperature schedule) are one warning line; a temperature_end other than 1 is an error.
    """
    folder = Path(folder)
    target = model.target(fusion)
    if not target.is_fusion:
        raise MTLConfigError(f"'{fusion}' is not a fusion; export it with save_adapterhub(model, task, folder)")
    if folder.exists() and not overwrite:
        raise MTLConfigError(f"{folder}: already exists (pass overwrite=True to replace it)")
    info = _backbone(model)
    model_type, hidden = info["model_type"], info["hidden_size"]
    # save_adapterhub names an adapter after its task: the first task that runs on it
    names = [next(t for t, r in model.records.items() if r.target.name == a and not r.target.is_fusion)
             for a in target.fused]
    config, differences = fusion_config_to_adapterhub(model.fusion_configs[fusion], fusion)
    problem = head_problem(model, fusion, with_head)
    tensors, prefix = {}, f"{PREFIXES[model_type]}."
    for key, p in model.part_parameters(("fusion", fusion)).items():
        _, layer, position, proj, kind = key.split(".")
        tensors[_ah_key(model_type, int(layer), position, fusion, proj, kind, prefix)] = p.detach().cpu().contiguous()
    where = model.adapter_locations(target.fused[0])
    positions = sorted({position for _, position in where})
    zeros, eye = torch.zeros(hidden, hidden), torch.eye(hidden)
    for layer in range(info["num_layers"]):  # AdapterHub has a fusion layer here too and expects its tensors
        for position in positions:
            if (layer, position) not in where:
                fill = {"query.weight": zeros, "query.bias": zeros[0], "key.weight": zeros, "key.bias": zeros[0],
                        **({"value.weight": eye} if config["value"] else {})}
                for part, tensor in fill.items():
                    proj, kind = part.split(".")
                    tensors[_ah_key(model_type, layer, position, fusion, proj, kind, prefix)] = tensor.clone()
    meta = export_meta(model, fusion)
    files = [(WEIGHTS, tensors, CONFIG, {**meta, "adapter_names": names, "config": config})]
    if with_head is not False and problem is None:
        files.append(head_file(model, fusion, meta))
    written = write_folder(folder, files)
    if problem:
        warn(f"{folder}: exported fusion '{fusion}' without its head: {problem}")
    if differences:
        warn(f"{folder}: AdapterHub runs fusion '{fusion}' differently in: {'; '.join(differences)}")
    return written
