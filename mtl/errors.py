"""The one exception type for user mistakes (bad config, bad file, bad name), and one-line warnings."""

import errno
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


def write_failure(path: "str | Path", err: OSError, note: str = "") -> MTLWriteError:
    """One line for an OS error met while writing under ``path``: the folder, the OS error and the file it hit."""
    hit = f" at {err.filename}" if err.filename and str(err.filename) != str(path) else ""
    return MTLWriteError(f"{path}: cannot be written ({err.strerror or err}{hit})" + (f"; {note}" if note else ""))
