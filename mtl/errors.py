"""The one exception type for user mistakes (bad config, bad file, bad name), and one-line warnings."""

import sys


class MTLConfigError(Exception):
    """A user mistake; the message names the file, key or value and what was expected.

    The CLI prints it as one line (``error: <message>``) and exits with status 2; any other
    exception is a bug and keeps its traceback.
    """


def warn(message: str) -> None:
    """Tell the user about something mtl did on their behalf (dropped rows, a leftover folder): one stderr line."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
