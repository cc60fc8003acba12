"""The optional AdapterHub venv that the peer checks run their AdapterHub half in (``setup_adapterhub.sh``)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PEERS = Path(__file__).resolve().parent
PEER_PYTHON = PEERS / ".venv-adapterhub" / "bin" / "python"


@contextmanager
def peer_work_dir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created) or a temporary folder for one check; without the venv, say how to make it and exit 0."""
    if not PEER_PYTHON.exists():
        print(f"skipped: no AdapterHub venv at {PEER_PYTHON}; create it with `bash benchmarks/peers/setup_adapterhub.sh`")
        raise SystemExit(0)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=keep is None)
        yield folder
