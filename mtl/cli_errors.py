"""One-line errors for both command lines (``train.py fit|...`` in `mtl.cli`, ``train.py continual`` in
`mtl.continual.cli`): config files read and checked, parser and interpolation errors explained, user mistakes told
from bugs. Owned by neither CLI, so neither imports the other."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from omegaconf.errors import OmegaConfBaseException

from mtl.errors import MTLConfigError


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config`` / ``-c``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_file(path: str) -> dict[str, Any]:
    """Read one ``--config`` file: it exists and is a YAML mapping (errors name the file and the line)."""
    file = Path(path)
    if not file.is_file():
        raise MTLConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise MTLConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        raise MTLConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if data is not None and not isinstance(data, dict):
        raise MTLConfigError(f"{path}: top level is a {type(data).__name__}, expected a mapping (model:, data:, ...)")
    return data or {}


def _has_key(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def closest_key(key: str, keys: list[str]) -> str | None:
    """The valid key most like ``key``: first among its siblings, then among all keys."""
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    for pool in (siblings, keys):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def explain_parse_error(message: str, keys: list[str], files: list[str]) -> str:
    """One line for a jsonargparse error: the file or option, the key, and what was expected."""
    keys = [k for k in keys if not k.endswith(".help") and k not in ("help", "print_config", "print_shtab")]
    unknown = re.search(r"(?:Group '([^']+)' )?does not accept option '([^']+)'", message)
    if unknown:
        group, key = unknown.groups()
        key = f"{group}.{key}" if group and not key.startswith(f"{group}.") else key
        where = next((f for f in reversed(files) if _has_key(check_config_file(f), key)), "config")
        near = closest_key(key, keys)
        return f"{where}: {key}: unknown key" + (f", did you mean '{near}'?" if near else "")
    unrecognized = re.search(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        option = unrecognized.group(1).split("=", 1)[0]
        near = closest_key(option.lstrip("-"), keys) if option.startswith("--") else None
        return f"{option}: unknown option" + (f", did you mean '--{near}'?" if near else "")
    flat = " ".join(message.split())
    parser_key = re.match(r'Parser key "([^"]+)": (.*)', flat)
    if parser_key:
        key, rest = parser_key.groups()
        rest = re.sub(r"<class '(\w+)'>", r"\1", rest)
        missing = re.fullmatch(r"Expected an? (.+?)\. Got value: None", rest)
        if missing:
            return f"{key}: missing, expected a {missing.group(1)}"
        return f"{key}: {rest}"[:400]
    return flat[:400]


def explain_interpolation_error(err: Exception) -> str:
    """One line for an omegaconf error: the key holding the ``${...}`` and the key it refers to."""
    def strip(key: str) -> str:  # keys are reported from above the subcommand ('fit.model.lr')
        head, _, rest = key.partition(".")
        return rest if head in LightningCLI.subcommands() else key

    key = strip(str(getattr(err, "full_key", "") or "config"))
    target = re.search(r"resolved to '([^']+)'", str(err))
    if target:
        return f"{key}: ${{...}} refers to '{strip(target.group(1))}', which is not a key of the configuration"
    return f"{key}: {str(err).splitlines()[0]}"


def user_mistake(err: BaseException) -> MTLConfigError | None:
    """The user mistake behind ``err`` (an `MTLConfigError`, or Lightning refusing a trainer setting), also when
    jsonargparse wrapped it while instantiating a class."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MTLConfigError):
            return err
        if isinstance(err, MisconfigurationException):
            return MTLConfigError(f"trainer: {' '.join(str(err).split())}")
        if isinstance(err, OmegaConfBaseException):  # a ${...} that does not resolve
            return MTLConfigError(explain_interpolation_error(err))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
