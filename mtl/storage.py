"""Exported parts on disk: folders of safetensors + JSON. Works on tensors and plain dicts, never on the model.

```
<run>/adapters/<task>/adapter.safetensors   adapters.<layer>.<attn|ffn>.<down|up>.<weight|bias>, head.<dense|out>.*
<run>/adapters/<task>/adapter_config.json   adapter config, backbone, labels, task spec
<run>/fusions/<name>/fusion.safetensors     fusion.<layer>.<attn|ffn>.<query|key|value>.*, head.<dense|out>.*
<run>/fusions/<name>/fusion_config.json     fusion config, adapter names in order with each file's SHA-256
```
Writes are atomic (`mtl.atomic`); an existing folder is replaced only when asked. Loading reads safetensors and
JSON only, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save_file

from mtl.atomic import fsync_file, recover, write_dir_atomic, write_json_atomic
from mtl.errors import MTLConfigError

FORMAT_VERSION = 1
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
FUSION_WEIGHTS, FUSION_CONFIG = "fusion.safetensors", "fusion_config.json"
BACKBONE_KEYS = ("model_type", "hidden_size", "num_layers")


def write_part(target: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], weights_name: str,
               config_name: str, overwrite: bool = False) -> Path:
    """Write ``target/`` (weights + config) atomically; refuse to replace an existing folder unless asked."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise MTLConfigError(f"{target}: already exists (pass overwrite=True / set overwrite: true to replace it)")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})
        fsync_file(tmp / weights_name)
        write_json_atomic(tmp / config_name, {"format_version": FORMAT_VERSION, **config})

    return write_dir_atomic(target, fill)


# the JSON shapes mtl reads back: key -> type(s), or a nested schema; a key ending in "?" may be absent or null
HEAD_SCHEMA = {"num_outputs": int, "problem": str, "pooling": str, "dropout": (int, float)}
ADAPTER_SCHEMA = {"task": str, "hidden_size": int, "num_layers": int, "adapter": dict, "head": HEAD_SCHEMA,
                  "backbone?": str, "model_type?": str, "adapter_name?": str, "labels?": [str], "task_spec?": dict}
FUSION_SCHEMA = {"fusion": str, "hidden_size": int, "num_layers": int, "fusion_config": dict, "head": HEAD_SCHEMA,
                 "adapters": [{"name": str, "file": str, "sha256": str}], "backbone?": str, "model_type?": str,
                 "labels?": [str], "task_spec?": dict}


def _type_name(expected: Any) -> str:
    if isinstance(expected, dict):
        return "an object"
    if isinstance(expected, list):
        item = {str: "strings", int: "integers"}.get(expected[0], "objects")
        return f"a list of {item}"
    names = {dict: "an object", str: "a string", int: "an integer", float: "a number", list: "a list"}
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def check_shape(source: str | Path, value: Any, expected: Any, key: str = "") -> None:
    """``value`` has the JSON shape ``expected`` (see ADAPTER_SCHEMA); one line naming the key otherwise."""
    where = f"{source}: {key}" if key else f"{source}: top level"
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            raise MTLConfigError(f"{where}: got {type(value).__name__}, expected {_type_name(expected)}")
        for name, sub in expected.items():
            optional, name = name.endswith("?"), name.rstrip("?")
            if value.get(name) is None:
                if not optional:
                    raise MTLConfigError(f"{source}: {key}{'.' if key else ''}{name}: missing, expected {_type_name(sub)}")
                continue
            check_shape(source, value[name], sub, f"{key}.{name}" if key else name)
    elif isinstance(expected, list):
        if not isinstance(value, list):
            raise MTLConfigError(f"{where}: got {value!r:.60}, expected {_type_name(expected)}")
        for i, item in enumerate(value):
            check_shape(source, item, expected[0], f"{key}[{i}]")
    else:
        types = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise MTLConfigError(f"{where}: got {value!r:.60}, expected {_type_name(expected)}")


def read_json(file: str | Path, expected: str) -> Any:
    """A JSON file's content; one line naming the file if it is missing, not UTF-8 or not JSON (``expected``: what
    it should be, for that line)."""
    file = Path(file)
    if not file.is_file():
        raise MTLConfigError(f"{file}: not found; expected {expected}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise MTLConfigError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start}), expected {expected}") from None
    except json.JSONDecodeError as err:
        raise MTLConfigError(f"{file}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}), expected "
                             f"{expected}") from None
    except OSError as err:
        raise MTLConfigError(f"{file}: cannot be read ({err.strerror}), expected {expected}") from None


def read_config(folder: str | Path, config_name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Read the JSON config of an exported folder and check it against ``schema`` (one line per mistake)."""
    file = Path(folder) / config_name
    data = read_json(file, f"the {config_name} of a folder mtl exported")
    if not isinstance(data, dict):
        raise MTLConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MTLConfigError(f"{file}: format_version {version!r} is not one this mtl reads (1..{FORMAT_VERSION})")
    check_shape(file, data, schema)
    return data


def check_finite(file: str | Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (read from ``file``) with no NaN or infinity in a floating-point tensor; one line naming the file and
    the first such tensor otherwise. Every tensor mtl reads passes here."""
    # a NaN weight never fails where it is read: it surfaces far away (a "singular covariance", NaN logits), so it is
    # refused at the read, where the file can still be named
    for name in sorted(tensors):
        value = tensors[name]
        if (value.is_floating_point() or value.is_complex()) and value.numel() and not bool(torch.isfinite(value).all()):
            bad = ~torch.isfinite(value)
            kinds = [k for k, m in (("NaN", torch.isnan(value)), ("infinity", torch.isinf(value))) if bool(m.any())]
            raise MTLConfigError(f"{file}: tensor {name} holds {int(bad.sum())} non-finite value(s) "
                                 f"({' and '.join(kinds)}) of {value.numel()}, expected finite numbers (the file is "
                                 "damaged or was written by a diverged run; export it again)")
    return tensors


def read_tensors(file: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (one line if it is missing, unreadable or holds NaN / infinity)."""
    file = Path(file)
    if not file.is_file():
        raise MTLConfigError(f"{file}: not found")
    try:
        tensors = load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for truncated or foreign files
        raise MTLConfigError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return check_finite(file, tensors)


def read_tensors_with_sha256(file: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A safetensors file's SHA-256 and its tensors, both from one read of its bytes (so a file replaced between two
    reads can never give a hash that does not belong to the tensors); refused as in `read_tensors`."""
    file = Path(file)
    try:
        data = file.read_bytes()
    except OSError as err:
        raise MTLConfigError(f"{file}: cannot be read ({err.strerror})") from None
    try:
        tensors = load(data)
    except Exception as err:  # noqa: BLE001 - as in read_tensors
        raise MTLConfigError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return hashlib.sha256(data).hexdigest(), check_finite(file, tensors)


def check_tensors(file: str | Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """The file holds exactly the expected tensor names and shapes."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise MTLConfigError(f"{file}: tensors do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise MTLConfigError(f"{file}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")


def check_backbone(data: dict[str, Any], have: dict[str, Any], source: str | Path, same_name: bool = False) -> None:
    """Refuse a part exported for another backbone: its shape always, and its name when ``same_name``."""
    for key in BACKBONE_KEYS:
        want = data.get(key)
        if want is not None and want != have[key]:
            raise MTLConfigError(f"{source}: {key} is {want!r} but the backbone has {have[key]!r} "
                                 f"(exported for backbone '{data.get('backbone')}')")
    if same_name and data.get("backbone") != have["backbone"]:
        raise MTLConfigError(f"{source}: exported for backbone '{data.get('backbone')}', but the backbone is "
                             f"'{have['backbone']}'")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CHECKPOINT_KEY = "mtl"  # the record mtl adds to every Lightning checkpoint it writes


def torch_load(file: Path, kind: str, expected: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain types only, never arbitrary pickled objects; a one-line
    error names the file (``kind``: what it is called in that error, ``expected``: what it should have been)."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing or succeeding
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MTLConfigError(f"{file}: holds pickled Python objects other than tensors, which mtl never unpickles "
                             f"(torch.load weights_only=True refused them); expected {expected}") from None
    except Exception as err:  # noqa: BLE001 - truncated or foreign files fail in many ways
        detail = next((line for line in str(err).splitlines() if line.strip()), "")[:120]
        raise MTLConfigError(f"{file}: not a readable {kind} ({type(err).__name__}: {detail}), "
                             f"expected {expected}") from None


def read_checkpoint(file: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint written by mtl; tensors and plain types only, never arbitrary pickled objects."""
    file = Path(file)
    if not file.is_file():
        raise MTLConfigError(f"{file}: checkpoint not found")
    data = torch_load(file, "checkpoint", "a .ckpt written by train.py fit")
    if not isinstance(data, dict) or not isinstance(data.get(CHECKPOINT_KEY), dict) or "state_dict" not in data:
        raise MTLConfigError(f"{file}: not an mtl checkpoint (no '{CHECKPOINT_KEY}' record), expected a .ckpt "
                             "written by train.py fit")
    return data


def task_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """Exported task folders under ``checkpoint_dir/adapters`` (or ``checkpoint_dir`` itself)."""
    root = Path(checkpoint_dir)
    base = root / "adapters" if (root / "adapters").is_dir() else root
    recover(base)  # report leftovers of interrupted exports; put back a task an interrupted overwrite left missing
    # hidden names are temporaries or the previous copies of interrupted writes, never a completed export
    dirs = sorted(p for p in base.iterdir() if not p.name.startswith(".") and (p / ADAPTER_CONFIG).is_file()) \
        if base.is_dir() else []
    if not dirs:
        raise MTLConfigError(f"{checkpoint_dir}: no exported tasks found (expected adapters/<task>/{ADAPTER_CONFIG})")
    return dirs


def fusion_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """Exported fusion folders under ``checkpoint_dir/fusions`` (none is fine)."""
    base = Path(checkpoint_dir) / "fusions"
    recover(base)  # as in task_dirs
    return sorted(p for p in base.iterdir() if not p.name.startswith(".") and (p / FUSION_CONFIG).is_file()) \
        if base.is_dir() else []
