"""AdapterHub `adapters` 1.3 folders, both ways, for plain bottleneck adapters: SeqBn, DoubleSeqBn, ParBn.

AdapterHub's ``save_adapter(folder, name, with_head=True, use_safetensors=True)`` writes, in one folder:
``adapter_config.json`` (name, model_type, hidden_size, version, config: the BnConfig fields), ``adapter.safetensors``
(``<layers>.<l>.<location>.adapters.<name>.adapter_down.0.*`` / ``.adapter_up.*``, maybe under a model prefix such as
``bert.``), ``head_config.json`` and ``model_head.safetensors`` (a classification head: ``heads.<name>.1.*`` dense,
``heads.<name>.4.*`` out; a one-layer tagging head, mtl's token_classification `TokenHead`: ``heads.<name>.1.*`` out).
Without use_safetensors it writes ``pytorch_adapter.bin`` / ``pytorch_model_head.bin``, read here with
``torch.load(weights_only=True)`` only. A config mtl cannot compute exactly is a one-line `MTLConfigError` naming the
file and key. AdapterHub reads mtl's exports with ``load_adapter(folder, use_safetensors=True)`` (its default reads only
the .bin files, which mtl never writes). Checked against AdapterHub 1.3.0 on MiniLM (BERT), both ways, by
benchmarks/peers/adapterhub_roundtrip.py; the other families' locations are read off AdapterHub's source.
AdapterFusion folders: `mtl.interop.adapterhub_fusion`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from mtl import model_files
from mtl import storage
from mtl.adapters.config import AdapterConfig
from mtl.arch import ARCHS
from mtl.atomic import fsync_file, write_dir_atomic, write_text_atomic
from mtl.errors import MTLConfigError, warn

if TYPE_CHECKING:
    from mtl.model import MTLModel

CONFIG, WEIGHTS, LEGACY_WEIGHTS = "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"
HEAD_CONFIG, HEAD_WEIGHTS, LEGACY_HEAD_WEIGHTS = "head_config.json", "model_head.safetensors", "pytorch_model_head.bin"
FORMAT_VERSION = "adapters.1.3.0"  # the release these files were checked against; any "version" stops legacy renames
# where AdapterHub keeps a layer's adapters, relative to the layer of mtl.arch's layer list: (attention, FFN)
_BERT_LIKE = ("attention.output", "output")
# layer attributes for DistilBERT and for ModernBERT (AdapterHub's plugin interface hooks adapters onto each layer)
_ON_LAYER = ("attention_adapters", "output_adapters")
LOCATIONS = {"bert": _BERT_LIKE, "roberta": _BERT_LIKE, "xlm-roberta": _BERT_LIKE, "electra": _BERT_LIKE,
             "deberta-v2": _BERT_LIKE, "distilbert": _ON_LAYER, "modernbert": _ON_LAYER}
MODEL_CLASSES = {"bert": "BertAdapterModel", "roberta": "RobertaAdapterModel", "xlm-roberta": "XLMRobertaAdapterModel",
                 "electra": "ElectraAdapterModel", "deberta-v2": "DebertaV2AdapterModel",
                 "distilbert": "DistilBertAdapterModel", "modernbert": "ModernBertModel"}
# adapter-transformers 2.x tensor names and unversioned activation names, renamed as AdapterHub's own loader does
_LEGACY_NAMES = ("attention_text_task_adapters", "attention_text_lang_adapters", "layer_text_task_adapters",
                 "layer_text_lang_adapters")
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_ACTIVATIONS = ("relu", "swish", "silu", "gelu", "tanh")  # transformers' get_activation equals mtl's for these
_INITS = {"bert": "bert", "mam_adapter": "mam"}
# fields that must keep this value: mtl has no adapter LayerNorm, gating, PHM, invertible adapter, stochastic depth
_FIXED = {"original_ln_after": True, "ln_before": False, "ln_after": False, "use_gating": False, "inv_adapter": None,
          "cross_adapter": False, "phm_layer": False, "stochastic_depth": 0.0}
# fields that change nothing while _FIXED holds (adapter_residual_before_ln only acts with ln_after, phm_* only with
# phm_layer, the seed only on a fresh init): any value is accepted; an export writes these
_INERT = {"init_weights_seed": None, "adapter_residual_before_ln": False, "inv_adapter_reduction_factor": None,
          "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
          "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
          "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True}
# AdapterHub's flex heads mtl holds: head_type -> the nn.Sequential index of each mtl head layer (the other indices are
# dropout and activation, which hold no tensors)
HEAD_LAYERS = {"classification": {"1": "dense", "4": "out"}, "multilabel_classification": {"1": "dense", "4": "out"},
               "tagging": {"1": "out"}, "question_answering": {"1": "out"}, "multiple_choice": {"1": "dense", "4": "out"}}
# AdapterHub's one-layer heads on every token -> the mtl kind whose head they are (TokenHead, QAHead)
TOKEN_HEADS = {"tagging": "token_classification", "question_answering": "extractive_qa"}
_MAPPED = {"architecture", "invertible_adapter", "mh_adapter", "output_adapter", "reduction_factor", "non_linearity",
           "original_ln_before", "residual_before_ln", "is_parallel", "scaling", "leave_out", "dropout", "init_weights"}


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_weights(folder: Path, safe: str, legacy: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The safetensors file, else the legacy .bin through torch.load(weights_only=True): tensors, never objects."""
    if (folder / safe).is_file():
        return storage.read_tensors(folder / safe), folder / safe
    file = folder / legacy
    if not file.is_file():
        raise MTLConfigError(f"{folder}: neither {safe} nor {legacy} found (expected a folder written by AdapterHub)")
    data = storage.torch_load(file, "torch file", "a dict of tensors (AdapterHub's .bin)")
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise MTLConfigError(f"{file}: expected a dict of tensor names to tensors, got {type(data).__name__}")
    return storage.check_finite(file, dict(data)), file


def adapter_config_from_adapterhub(cfg: dict[str, Any], num_layers: int, source: str | Path) -> AdapterConfig:
    """mtl's `AdapterConfig` for AdapterHub's BnConfig dict (adapter_config.json's "config")."""
    def get(key: str, default: Any, ok: Any, expected: str) -> Any:
        if default is KeyError and key not in cfg:
            raise MTLConfigError(f"{source}: config.{key}: missing (a required BnConfig field)")
        value = cfg.get(key, default)
        if not ok(value):
            raise MTLConfigError(f"{source}: config.{key} is {value!r}, expected {expected}")
        return value

    get("architecture", None, lambda v: v is None, "none (a bottleneck adapter: SeqBn, DoubleSeqBn or ParBn)")
    unknown = sorted(set(cfg) - _MAPPED - set(_FIXED) - set(_INERT))
    if unknown:
        raise MTLConfigError(f"{source}: config has keys mtl does not know {unknown}, expected BnConfig fields only")
    for key, want in _FIXED.items():
        get(key, want, lambda v, w=want: v == w, f"{want!r} (mtl does not support other values)")
    get("invertible_adapter", None, lambda v: not v, "null (mtl has no invertible adapters)")  # v1 of inv_adapter
    mh = get("mh_adapter", KeyError, _is_bool, "true or false")
    out = get("output_adapter", KeyError, lambda v: _is_bool(v) and (v or mh), "true, or mh_adapter true")
    parallel = get("is_parallel", False, _is_bool, "true or false")
    ln_before = get("original_ln_before", False, _is_bool, "true or false")
    residual = get("residual_before_ln", True, _is_bool, "true or false ('post_add' is not in mtl)")
    activation = get("non_linearity", KeyError, lambda v: str(v).lower() in _ACTIVATIONS,
                     f"one of {list(_ACTIVATIONS)} (mtl has no other)").lower()
    scaling = get("scaling", 1.0, _is_number, "a number (mtl has no learned or per-channel scaling)")
    init = get("init_weights", "bert", lambda v: v in _INITS, f"one of {sorted(_INITS)}")
    dropout = get("dropout", 0.0, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    leave_out = get("leave_out", [], lambda v: isinstance(v, list) and all(_is_number(i) and i == int(i) for i in v),
                    "a list of layer indices")
    leave_out = sorted({int(i) for i in leave_out if 0 <= i < num_layers})  # AdapterHub ignores layers not there
    factor = get("reduction_factor", KeyError, lambda v: isinstance(v, Mapping) or _is_number(v) and v > 0,
                 "a positive number")
    if isinstance(factor, Mapping):  # per-layer factors: mtl has one width for all layers
        factors = {factor.get(str(i), factor.get("default")) for i in range(num_layers) if i not in leave_out}
        factor = factors.pop() if len(factors) == 1 else None
        if not _is_number(factor) or factor <= 0:
            raise MTLConfigError(f"{source}: config.reduction_factor is {cfg['reduction_factor']!r}, expected one "
                                 "positive factor for every adapter layer (mtl has no per-layer widths)")
    config = AdapterConfig(type="parallel" if parallel else ("houlsby" if mh and out else "pfeiffer"),
                           positions=[p for p, on in (("attn", mh), ("ffn", out)) if on],
                           reduction_factor=float(factor), non_linearity=activation, parallel=parallel,
                           original_ln_before=ln_before,
                           residual_before_ln=residual, scaling=float(scaling), dropout=float(dropout),
                           leave_out=leave_out, init=_INITS[init])
    try:
        config.layers(num_layers)
    except MTLConfigError as err:
        raise MTLConfigError(f"{source}: {err}") from None
    return config


def adapter_config_to_adapterhub(config: AdapterConfig, layers: Sequence[int], num_layers: int,
                                 hidden_size: int) -> dict[str, Any]:
    """AdapterHub's BnConfig dict for an mtl adapter that sits in ``layers``."""
    width = config.bottleneck(hidden_size)
    factor = config.reduction_factor if config.bottleneck_size is None else hidden_size / width
    if max(1, int(hidden_size // factor)) != width:  # AdapterHub's width is int(hidden // factor): beat float rounding
        factor = hidden_size / (width + 0.5)
    return {**_INERT, **_FIXED, "mh_adapter": "attn" in config.positions, "output_adapter": "ffn" in config.positions,
            "reduction_factor": float(factor), "non_linearity": config.non_linearity,
            "original_ln_before": bool(config.original_ln_before),
            "residual_before_ln": bool(config.residual_before_ln),
            "is_parallel": bool(config.parallel), "scaling": float(config.scaling),  # AdapterHub refuses an int
            "leave_out": [i for i in range(num_layers) if i not in layers], "dropout": float(config.dropout),
            # mtl's "identity" (normal down, zero up) is not in AdapterHub; "mam_adapter" also starts at a zero up
            "init_weights": "bert" if config.init == "bert" else "mam_adapter"}


def _adapter_tensors(weights: dict[str, torch.Tensor], model_type: str, name: str,
                     file: Path) -> dict[str, torch.Tensor]:
    """AdapterHub names -> mtl's part names (adapters.<layer>.<attn|ffn>.<down|up>.<weight|bias>)."""
    attn, ffn = LOCATIONS[model_type]
    layers = ARCHS[model_type].layers
    pattern = re.compile(rf"^(?:\w+\.)?{re.escape(layers)}\.(\d+)\.({re.escape(attn)}|{re.escape(ffn)})\.adapters\."
                         rf"{re.escape(name)}\.(adapter_down\.0|adapter_up)\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        match = pattern.match(re.sub("|".join(_LEGACY_NAMES), "adapters", key))
        if match is None:
            raise MTLConfigError(f"{file}: tensor '{key}' is not a bottleneck tensor of adapter '{name}', expected "
                                 f"names like '{layers}.0.{ffn}.adapters.{name}.adapter_up.weight'")
        layer, location, proj, kind = match.groups()
        mtl_key = (f"adapters.{int(layer)}.{'attn' if location == attn else 'ffn'}."
                   f"{'down' if proj.startswith('adapter_down') else 'up'}.{kind}")
        if mtl_key in out:
            raise MTLConfigError(f"{file}: tensor '{key}' appears twice (with and without a model prefix)")
        out[mtl_key] = tensor
    return out


def _head_dropout(backbone_config: Any) -> float:
    """AdapterHub's default head dropout: the backbone's classifier_dropout, else hidden_dropout_prob, else 0."""
    values = [getattr(backbone_config, k, None) for k in ("classifier_dropout", "hidden_dropout_prob")]
    return float(next((v for v in values if v is not None), 0.0))


def _read_head(folder: Path, hidden_size: int, backbone_config: Any) -> dict[str, Any] | str:
    """The head as add_task arguments + mtl tensors, or why it does not map onto mtl's TaskHead or TokenHead."""
    file = folder / HEAD_CONFIG
    if not file.is_file():
        return f"{folder}: no {HEAD_CONFIG}"
    data = storage.read_config(folder, HEAD_CONFIG, {})  # a JSON object; its fields are checked below
    cfg = data.get("config")
    if not isinstance(cfg, dict):
        return f"{file}: config is {cfg!r:.40} (a static Hugging Face head), expected a flex classification head"
    tagging = cfg.get("head_type") in TOKEN_HEADS
    if tagging:  # mtl's TokenHead / QAHead is this head: dropout, out on every token (activation_function acts between
        # layers); a question-answering head has two outputs, a start and an end logit
        checks = {"layers": cfg.get("layers") == 1, "bias": cfg.get("bias", True) is True}
        if cfg["head_type"] == "question_answering":
            checks["num_labels"] = cfg.get("num_labels") == 2
        rule = (f"mtl's {cfg['head_type']} head is AdapterHub's with layers 1 and bias true (one linear layer)"
                + (" and num_labels 2 (start, end)" if cfg["head_type"] == "question_answering" else ""))
    else:  # mtl's TaskHead is this head: dropout, dense, tanh, dropout, out on the first token
        checks = {"head_type": cfg.get("head_type") in HEAD_LAYERS, "layers": cfg.get("layers") == 2,
                  "activation_function": str(cfg.get("activation_function")).lower() == "tanh",
                  "use_pooler": not cfg.get("use_pooler"), "bias": cfg.get("bias", True) is True}
        rule = ("mtl's head is AdapterHub's (multilabel_)classification or multiple_choice head with layers 2, tanh, "
                "use_pooler false and bias true")
        if not checks["head_type"]:
            rule += ", or its tagging or question_answering head with layers 1"
    bad = next((key for key, ok in checks.items() if not ok), None)
    if bad:
        return f"{file}: config.{bad} is {cfg.get(bad)!r}; {rule}"
    choices = cfg["head_type"] == "multiple_choice"  # one score per (question, choice) row, num_choices rows
    count = "num_choices" if choices else "num_labels"
    num, dropout = cfg.get(count), cfg.get("dropout_prob")
    if not isinstance(num, int) or isinstance(num, bool) or num < (2 if choices else 1):
        raise MTLConfigError(f"{file}: config.{count} is {num!r}, expected an integer >= {2 if choices else 1}")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        raise MTLConfigError(f"{file}: config.dropout_prob is {dropout!r}, expected null or a number in [0, 1)")
    weights, wfile = _read_weights(folder, HEAD_WEIGHTS, LEGACY_HEAD_WEIGHTS)
    layers = HEAD_LAYERS[cfg["head_type"]]
    pattern = re.compile(rf"^(?:\w+\.)?heads\.{re.escape(str(data.get('name')))}\.({'|'.join(layers)})\.(weight|bias)$")
    tensors = {}
    for key, tensor in weights.items():
        if other_part(key, "heads", str(data.get("name"))):
            continue
        match = pattern.match(key)
        if match is None:
            raise MTLConfigError(f"{wfile}: tensor '{key}' is not a layer of head '{data.get('name')}', expected "
                                 f"heads.{data.get('name')}.<{'|'.join(layers)}>.<weight|bias>")
        tensors[f"head.{layers[match[1]]}.{match[2]}"] = tensor
    size = torch.Size
    outputs = 1 if choices else num
    shapes = {"head.out.weight": size([outputs, hidden_size]), "head.out.bias": size([outputs])}
    if not tagging:
        shapes.update({"head.dense.weight": size([hidden_size, hidden_size]), "head.dense.bias": size([hidden_size])})
    storage.check_tensors(wfile, tensors, shapes)
    label2id = cfg.get("label2id")
    labels = [str(k) for k, _ in sorted(label2id.items(), key=lambda kv: kv[1])] \
        if isinstance(label2id, dict) and sorted(label2id.values()) == list(range(num)) else None
    if cfg["head_type"] == "question_answering":  # start and end are outputs, not label names
        labels = None
    if choices:  # mtl names the choice positions (as many as num_choices): AdapterHub's names, else their numbers
        labels = labels or [str(i) for i in range(num)]
        problem = "multiple_choice"
    elif tagging:
        problem = TOKEN_HEADS[cfg["head_type"]]
    elif cfg["head_type"] == "multilabel_classification":
        problem = "multilabel"
    else:  # AdapterHub's classification head with one label is its regression head (MSE loss)
        problem = "regression" if num == 1 else "classification"
    return {"num_outputs": outputs, "labels": labels, "tensors": tensors, "problem": problem,
            "dropout": float(dropout) if dropout is not None else _head_dropout(backbone_config)}


def other_part(key: str, kind: str, name: str) -> bool:
    """Whether ``key`` belongs to another head or fusion whose name starts with ``name`` ('a0,a1' for 'a0').

    AdapterHub saves the tensors whose names contain ``<kind>.<name>`` (no closing dot), so its file for head 'a0'
    also holds the head of fusion 'a0,a1' when the model has one; they are not this part's and are skipped.
    """
    return re.search(rf"(?:^|\.){re.escape(kind)}\.{re.escape(name)}[^.]", key) is not None


def _backbone(model: MTLModel) -> dict[str, Any]:
    info = model_files.backbone_info(model)
    if info["model_type"] not in LOCATIONS:
        raise MTLConfigError(f"backbone model_type '{info['model_type']}' has no AdapterHub layout here, expected one "
                             f"of {sorted(LOCATIONS)}")
    return info


def load_adapterhub(model: MTLModel, folder: str | Path, task: str | None = None, num_labels: int | None = None,
                    labels: Sequence[str] | None = None, overwrite: bool = False) -> str:
    """Add the adapter (and head) of a folder written by AdapterHub's save_adapter to ``model``; returns the task.

    A head that does not map onto mtl's (or none) is an error unless ``num_labels`` asks for a fresh head (cls pooled).
    """
    folder = Path(folder)
    file = folder / CONFIG
    data = storage.read_config(folder, CONFIG, {})  # a JSON object; its fields are checked below
    if not isinstance(data.get("config"), dict):
        hint = " (this is an mtl export: use load_task)" if "format_version" in data else ""
        raise MTLConfigError(f"{file}: config is {data.get('config')!r:.40}, expected AdapterHub's adapter "
                             f"config{hint}")
    info = _backbone(model)
    for key in ("model_type", "hidden_size"):
        if data.get(key) is not None and data[key] != info[key]:
            raise MTLConfigError(f"{file}: {key} is {data[key]!r} but the backbone has {info[key]!r}")
    model_type, hidden, num_layers = info["model_type"], info["hidden_size"], info["num_layers"]
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise MTLConfigError(f"{file}: name is {name!r}, expected the adapter's name")
    cfg = dict(data["config"])
    if "version" not in data and isinstance(cfg.get("non_linearity"), str):
        cfg["non_linearity"] = _LEGACY_ACTIVATIONS.get(cfg["non_linearity"], cfg["non_linearity"])
    config = adapter_config_from_adapterhub(cfg, num_layers, file)
    weights, wfile = _read_weights(folder, WEIGHTS, LEGACY_WEIGHTS)
    tensors = _adapter_tensors(weights, model_type, name, wfile)
    width = config.bottleneck(hidden)
    shapes = {"down.weight": (width, hidden), "down.bias": (width,), "up.weight": (hidden, width), "up.bias": (hidden,)}
    storage.check_tensors(wfile, tensors, {f"adapters.{layer}.{position}.{key}": torch.Size(shape)
                                           for layer in config.layers(num_layers) for position in config.positions
                                           for key, shape in shapes.items()})
    head = resolve_head(model, folder, num_labels, labels, "adapter")
    task = task or name
    # the task's adapter is named like it: one that other tasks or fusions use must not be replaced or shared
    users = [t for t, r in model.records.items() if t != task and task in (r.target.name, *r.target.fused)]
    if users or task in model.fusion_configs:
        raise MTLConfigError(f"adapter name '{task}' is already used by {users or 'a fusion'}; import it under "
                             "another task=")
    if task in model.records and overwrite:  # all checked: only now change the model
        model.remove_task(task)
    model.add_task(task, head["num_outputs"], config, problem=head["problem"], pooling="cls",
                   head_dropout=head["dropout"], labels=head["labels"])
    copy_into(model.task_parameters(task), {**tensors, **head["tensors"]})
    return task


class HeadNotUsable(MTLConfigError):
    """A folder's head is missing or does not map onto mtl's; ``problem`` (which one) lets a CLI give its own advice."""

    def __init__(self, problem: str, message: str) -> None:
        super().__init__(message)
        self.problem = problem


def resolve_head(model: MTLModel, folder: Path, num_labels: int | None, labels: Sequence[str] | None,
                 what: str) -> dict[str, Any]:
    """The folder's head as add_task arguments + tensors, or a fresh head when ``num_labels`` asks for one."""
    head = _read_head(folder, model.hidden_size, model.backbone.config)
    if isinstance(head, str):
        if num_labels is None:
            raise HeadNotUsable(head, f"{head}; pass num_labels to import the {what} with a fresh head")
        warn(f"{head}; importing the {what} with a fresh {num_labels}-label classification head")
        head = {"num_outputs": num_labels, "labels": None, "tensors": {}, "problem": "classification",
                "dropout": _head_dropout(model.backbone.config)}
    elif num_labels is not None and num_labels != head["num_outputs"]:
        raise MTLConfigError(f"{folder / HEAD_CONFIG}: the head has {head['num_outputs']} labels, but num_labels is "
                             f"{num_labels}")
    names = len(head["labels"]) if head["problem"] == "multiple_choice" else head["num_outputs"]
    if labels is not None and len(labels) != names:
        raise MTLConfigError(f"labels: {len(labels)} names for a head with {names} "
                             f"{'choices' if head['problem'] == 'multiple_choice' else 'outputs'}")
    if labels is not None:
        head["labels"] = list(labels)
    return head


def copy_into(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy checked tensors into a freshly added task's parameters (a head without tensors keeps its init)."""
    with torch.no_grad():
        for key, p in params.items():
            if key in tensors:
                p.copy_(tensors[key])


def _head_problem(head: Any) -> str | None:
    """Why AdapterHub cannot express this mtl head, or None."""
    if head.problem in TOKEN_HEADS.values():  # a TokenHead / QAHead is AdapterHub's one-layer tagging / QA head
        return None
    if head.pooling != "cls":
        return (f"its head pools the '{head.pooling}' of the tokens, AdapterHub's heads read the first token "
                "(train with pooling 'cls' to export the head)")
    if head.problem == "regression" and head.num_outputs != 1:
        return "its regression head has several outputs, AdapterHub's has one"
    if head.problem == "multiple_choice" and head.num_outputs != 1:
        return "its multiple-choice head scores each choice with several outputs, AdapterHub's with one"
    if head.problem == "classification" and head.num_outputs < 2:
        return "its classification head has one output, which AdapterHub reads as regression"
    return None


def save_adapterhub(model: MTLModel, task: str, folder: str | Path, overwrite: bool = False,
                    with_head: bool | None = None) -> Path:
    """Write ``folder`` in AdapterHub's save_adapter layout; AdapterHub: load_adapter(folder, use_safetensors=True).

    ``with_head``: None writes the head where AdapterHub can express it (cls pooling) and else the adapter alone, with
    one warning line; True raises instead of leaving the head out; False never writes it.
    """
    folder = Path(folder)
    target = model.target(task)
    if target.is_fusion:
        raise MTLConfigError(f"'{task}' is a fusion; only plain adapters are exported in AdapterHub's format")
    if folder.exists() and not overwrite:
        raise MTLConfigError(f"{folder}: already exists (pass overwrite=True to replace it)")
    info = _backbone(model)
    model_type, hidden = info["model_type"], info["hidden_size"]
    config = model.adapter_configs[target.name]
    if config.robust_drop and config.drop_first:
        raise MTLConfigError(f"task '{task}': adapter.drop_first {config.drop_first} with robust_drop evaluates "
                             "without the adapters of the first layers, which AdapterHub would run; set drop_first 0")
    problem = head_problem(model, task, with_head)
    attn, ffn = LOCATIONS[model_type]
    tensors = {}
    for key, p in model.part_parameters(("adapter", target.name)).items():
        _, layer, position, proj, kind = key.split(".")
        tensors[f"{ARCHS[model_type].layers}.{layer}.{attn if position == 'attn' else ffn}.adapters.{task}."
                f"{'adapter_down.0' if proj == 'down' else 'adapter_up'}.{kind}"] = p.detach().cpu().contiguous()
    meta = export_meta(model, task)
    layers = sorted({layer for layer, _ in model.adapter_locations(target.name)})
    files = [(WEIGHTS, tensors, CONFIG,
              {**meta, "config": adapter_config_to_adapterhub(config, layers, info["num_layers"], hidden)})]
    if with_head is not False and problem is None:
        files.append(head_file(model, task, meta))
    written = write_folder(folder, files)
    if problem:
        warn(f"{folder}: exported the adapter of '{task}' without its head: {problem}")
    return written


def head_problem(model: MTLModel, task: str, with_head: bool | None) -> str | None:
    """Why the task's head is left out of an export (None: it is written); raises where ``with_head`` is True."""
    problem = _head_problem(model.heads[task]) if with_head is not False else None
    if problem and with_head:
        raise MTLConfigError(f"task '{task}': {problem}; export with with_head=False to leave the head out")
    return problem


def export_meta(model: MTLModel, name: str) -> dict[str, Any]:
    """The top-level fields AdapterHub's build_full_config writes beside every config."""
    info = _backbone(model)
    return {"hidden_size": info["hidden_size"], "model_class": MODEL_CLASSES[info["model_type"]],
            "model_name": model.backbone_name, "model_type": info["model_type"], "name": name,
            "version": FORMAT_VERSION}


def head_file(model: MTLModel, task: str, meta: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor], str, dict]:
    """(weights name, tensors, config name, config) of the task's head as AdapterHub's flex classification head, or
    its one-layer tagging head for a tagger."""
    head, labels = model.heads[task], model.records[task].labels
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    if head.problem == "extractive_qa":  # exactly QuestionAnsweringHead's config keys
        # label2id: what AdapterHub's own add_qa_head writes (its model config's default names for 2 labels)
        head_config = {"head_type": "question_answering", "num_labels": 2, "layers": 1, "activation_function": "tanh",
                       "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "dropout_prob": head.dropout.p}
    elif head.problem == "multiple_choice":  # exactly MultipleChoiceHead's config keys
        head_config = {"head_type": "multiple_choice", "num_choices": len(labels), "layers": 2,
                       "activation_function": "tanh", "label2id": label2id, "use_pooler": False,
                       "dropout_prob": head.dropout.p}
    elif head.problem == "token_classification":
        # exactly TaggingHead's config keys: AdapterHub passes them all to TaggingHead(), which takes no use_pooler or
        # bias; activation_function (its default) only acts between layers, and one layer has none
        head_config = {"head_type": "tagging", "num_labels": head.num_outputs, "layers": 1,
                       "activation_function": "tanh", "dropout_prob": head.dropout.p, "label2id": label2id}
    else:
        head_config = {"head_type": "multilabel_classification" if head.problem == "multilabel" else "classification",
                       "num_labels": head.num_outputs, "layers": 2, "activation_function": "tanh", "use_pooler": False,
                       "bias": True, "dropout_prob": head.dropout.p, "label2id": label2id}
    # AdapterHub names the head like the adapter or fusion it belongs to (meta's name)
    head_tensors = {f"heads.{meta['name']}.{index}.{kind}": getattr(getattr(head, layer), kind).detach().cpu()
                    .contiguous() for index, layer in HEAD_LAYERS[head_config["head_type"]].items()
                    for kind in ("weight", "bias")}
    return HEAD_WEIGHTS, head_tensors, HEAD_CONFIG, {**meta, "config": head_config}


def write_folder(folder: Path, files: list[tuple[str, dict[str, torch.Tensor], str, dict]]) -> Path:
    """Write (weights name, tensors, config name, config) files into ``folder`` atomically."""
    def fill(tmp: Path) -> None:
        for weights_name, weights, config_name, data in files:
            save_file(weights, str(tmp / weights_name), metadata={"format": "pt"})
            fsync_file(tmp / weights_name)
            write_text_atomic(tmp / config_name, json.dumps(data, indent=2, sort_keys=True))  # sorted, as AdapterHub

    return write_dir_atomic(folder, fill)
