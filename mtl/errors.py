"""The one exception type for user mistakes (bad config, bad file, bad name)."""


class MTLConfigError(Exception):
    """A user mistake; the message names the file, key or value and what was expected.

    The CLI prints it as one line (``error: <message>``) and exits with status 2; any other
    exception is a bug and keeps its traceback.
    """
