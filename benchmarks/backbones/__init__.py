"""Random backbones of a given family and shape for the benchmarks (``--backbone-config NAME|FILE``).

A shape is a JSON object: ``model_type`` plus Hugging Face config fields, e.g. ``bert-base.json`` here. Keys starting
with ``_`` are notes (``_source``: the public config it mirrors) and are dropped before the config is built. The model
is ``AutoModel.from_config(AutoConfig.for_model(model_type, **fields))`` with weights drawn under a fixed seed (in a
forked RNG, so the caller's random stream is untouched); nothing is downloaded. Throughput depends on shapes only, so
a random model times like the pretrained one.

Used by benchmarks/train_throughput.py and benchmarks/multitask_inference.py (both put this folder's parent first on
``sys.path`` by being run as scripts from it) and by tests/test_benchmark_backbones.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# config attributes that hold a token id: moved into a shrunken vocabulary with it
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "mask_token_id",
                 "unk_token_id")


class ShapeError(ValueError):
    """A shape that cannot be found, read or built: one line."""


def names() -> list[str]:
    """The short names of the shapes shipped here (``bert-base``, ...)."""
    return sorted(p.stem for p in HERE.glob("*.json"))


def shape_path(spec: str | Path) -> Path:
    """A short name from this folder, or a path to a JSON file."""
    if isinstance(spec, str) and (HERE / f"{spec}.json").is_file():
        return HERE / f"{spec}.json"
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    raise ShapeError(f"--backbone-config '{spec}': neither a shape name ({', '.join(names())}) nor a JSON file")


def load_shape(spec: str | Path | dict) -> tuple[dict[str, Any], dict[str, str]]:
    """(config fields including ``model_type``, without ``_`` keys; notes: name, path, source)."""
    if isinstance(spec, dict):
        raw, notes = dict(spec), {"name": "inline", "path": "-"}
    else:
        path = shape_path(spec)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ShapeError(f"--backbone-config {path}: cannot read it as JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ShapeError(f"--backbone-config {path}: expected a JSON object, got {type(raw).__name__}")
        notes = {"name": path.stem, "path": str(path)}
    notes["source"] = str(raw.get("_source", "no _source given"))
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    if not isinstance(fields.get("model_type"), str):
        raise ShapeError(f"--backbone-config {notes['path']}: no \"model_type\" string (e.g. \"bert\", \"deberta-v2\")")
    return fields, notes


def build_config(fields: dict[str, Any], **overrides: Any):
    """``AutoConfig.for_model(model_type, **fields, **overrides)``; an unknown model_type is a `ShapeError`."""
    from transformers import AutoConfig

    merged = {**fields, **overrides}
    model_type = merged.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **merged)
    except (ValueError, KeyError) as err:
        raise ShapeError(f"model_type '{model_type}': {err}".splitlines()[0]) from None


def shrink(fields: dict[str, Any], layers: int = 2, hidden: int = 64, heads: int = 2, intermediate: int = 128,
           vocab: int = 256) -> dict[str, Any]:
    """The same family at test size. Token ids of the config (pad, bos, ... including the family's defaults) that
    would fall outside the new vocabulary keep their distance from its end (ModernBERT's specials sit at its top)."""
    full = build_config(fields)
    small = {**fields, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
             "intermediate_size": intermediate, "vocab_size": vocab}
    for key in TOKEN_ID_KEYS:
        value = getattr(full, key, None)
        if isinstance(value, int) and value >= vocab:
            small[key] = max(0, vocab - (full.vocab_size - value))
    return small


def build_backbone(spec: str | Path | dict, seed: int = 0, **overrides: Any):
    """A randomly initialised ``AutoModel`` of the shape (eval mode), its weights drawn under ``seed``."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    fields, notes = load_shape(spec)
    config = build_config(fields, **overrides)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModel.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    model.config._name_or_path = f"random {notes['name']} (seed {seed})"
    model.benchmark_shape = {**notes, "seed": str(seed)}
    return model


def token_range(config) -> tuple[int, int]:
    """[low, high) for random token ids: inside the vocabulary, past its first ids and short of its last 8 (where
    the families here keep their special tokens); [1000, 30000) for the full-size vocabularies (as the MiniLM results
    always used)."""
    vocab = int(config.vocab_size)
    high = min(30000, vocab - 8)
    low = min(1000, vocab // 8)
    if high <= low:
        raise ShapeError(f"vocab_size {vocab} is too small for random token ids (expected at least 16)")
    return low, high


def random_ids(config, batch: int, seq: int, generator=None):
    """Random token ids inside ``config``'s vocabulary (see `token_range`)."""
    import torch

    low, high = token_range(config)
    return torch.randint(low, high, (batch, seq), generator=generator)


def describe(backbone) -> str:
    """One line naming the backbone and its shape, for the benchmark tables."""
    c = backbone.config
    shape = getattr(backbone, "benchmark_shape", None)
    if shape is None:
        what = getattr(backbone, "benchmark_name", None) or f"pretrained {c.model_type}"
    else:
        source = shape["source"].split(" (")[0]
        what = f"random {c.model_type} '{shape['name']}' (seed {shape['seed']}; mirrors {source})"
    low, high = token_range(c)
    attn = getattr(c, "_attn_implementation", None) or "default"
    return (f"{what}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
            f"intermediate {c.intermediate_size}, vocab {c.vocab_size}, attention {attn}, token ids in [{low}, {high})")


def load(spec: str | None, seed: int = 0):
    """The benchmarks' backbone: the pretrained MiniLM-L6 for None, else a random one of the shape ``spec``."""
    if spec is None:
        from mtl.backbone import load_backbone

        model = load_backbone("minilm-l6")
        model.benchmark_name = "pretrained all-MiniLM-L6-v2 (minilm-l6)"
        return model
    return build_backbone(spec, seed)
