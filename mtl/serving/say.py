"""`say`: the one way the server writes a log line: a timestamp, ``serve:``, and the line without control characters."""

from __future__ import annotations

import sys
import time


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped as repr does (a hostile name cannot forge log lines)."""
    return text if text.isprintable() else "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def say(line: str) -> None:
    """Print one timestamped log line, made `printable`."""
    clean = printable(line)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    try:
        print(f"{stamp} serve: {clean}", file=sys.stdout, flush=True)
    except (BrokenPipeError, OSError):  # the terminal or pipe is gone (e.g. `| tee`, Ctrl-C): never a reason to fail
        pass
