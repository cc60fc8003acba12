"""`say`: the one way the server writes a log line: a timestamp, ``serve:``, and the line without control characters."""

from __future__ import annotations

import re
import sys
import time

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def say(line: str) -> None:
    """Print one timestamped log line (control characters escaped, so a hostile name cannot forge lines)."""
    clean = _CONTROL.sub(lambda m: repr(m.group())[1:-1], line)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    try:
        print(f"{stamp} serve: {clean}", file=sys.stdout, flush=True)
    except (BrokenPipeError, OSError):  # the terminal or pipe is gone (e.g. `| tee`, Ctrl-C): never a reason to fail
        pass
