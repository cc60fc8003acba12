"""The one exception type for user mistakes (bad config, bad file, bad name), and one-line warnings."""

import errno
import os
import sys
from pathlib import Path


class MTLConfigError(Exception):
    """A user mistake; the message names the file, key or value and what was expected.

    The CLI prints it as one line (``error: <message>``) and exits with status 2; any other
    exception is a bug and keeps its traceback.
    """


def warn(message: str) -> None:
    """Tell the user about something mtl did on their behalf (dropped rows, a leftover folder): one stderr line."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# the OS errors that mean "this output cannot be written here", as opposed to a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG}


class MTLWriteError(MTLConfigError):
    """An output could not be written (disk full, no permission, read-only file system): not a bug, so one line too."""


def _free_space(path: "str | Path") -> str:
    """``, 12 KiB free there``: what the filesystem holding ``path`` has left (so a full disk is named by its size)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return ""
    free = float(stat.f_bavail * stat.f_frsize)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    return f", {free:,.0f} {unit} free there" if unit == "bytes" else f", {free:,.1f} {unit} free there"


def write_failure(path: "str | Path", err: OSError, note: str = "") -> MTLWriteError:
    """One line for an OS error met while writing under ``path``: the folder, the OS error and the file it hit (and
    the space left, for a full disk)."""
    hit = f" at {err.filename}" if err.filename and str(err.filename) != str(path) else ""
    space = _free_space(err.filename or path) if err.errno == errno.ENOSPC else ""  # a quota is per user, not free space
    return MTLWriteError(f"{path}: cannot be written ({err.strerror or err}{hit}{space})" + (f"; {note}" if note else ""))
