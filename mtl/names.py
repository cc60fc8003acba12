"""The one rule for task, adapter and fusion names: a name becomes a folder and an ``nn.ModuleDict`` key."""

from __future__ import annotations

import re

from torch import nn

from mtl.errors import MTLConfigError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
INVALID = "1-255 letters, digits, '_' or '-', not starting with '-'"


def name_problem(value: object) -> str | None:
    """None for a good name, else what it should have been."""
    # fullmatch: match with '$' would accept a trailing newline; 255: the longest folder name a filesystem takes
    if not isinstance(value, str) or not _NAME.fullmatch(value) or len(value) > 255:
        return INVALID
    if hasattr(nn.ModuleDict(), value):  # names key ModuleDicts, which refuse a key that is one of their attributes
        return "another name: it is a method of torch's nn.Module, like 'half' or 'train'"
    return None


def check_name(value: object, what: str) -> None:
    """Raise a one-line `MTLConfigError` naming ``what`` unless ``value`` is a good name."""
    problem = name_problem(value)
    if problem == INVALID:
        raise MTLConfigError(f"{what} '{value}' is invalid, expected {INVALID}")
    if problem is not None:
        raise MTLConfigError(f"{what} '{value}' is reserved (a method of torch's nn.Module, like 'half' or 'train'), "
                             "expected another name")
