"""Atomic writes: a temporary file or folder beside the target, fsync, then one rename (or one exchange).

A crash at any point leaves either the old target or the new one under its name, never a half-written one and
never none. Temporaries are hidden (``.<name>.<random>.tmp``; a replaced folder may briefly be
``.<name>.<random>.old``): loaders skip names starting with '.', `recover` reports what an interrupted write left
behind, and the next write of the same target removes it (or puts a missing target back from its ``.old`` copy).
Two processes writing the same target at the same time are not supported.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl.errors import warn, write_failure

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
# errnos meaning "this kernel / filesystem cannot exchange": fall back to two renames
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
# what write_dir_atomic leaves when killed: .<target name>.<mkdtemp's random part>.<tmp|old>
KEPT = "any previous version is kept, no temporary is left"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.(?P<kind>tmp|old)")


def _pause(step: str) -> None:
    """Test hook only: when $MTL_TEST_PAUSE_AT is ``step``, write it to $MTL_TEST_PAUSE_FILE and sleep to be killed."""
    if os.environ.get("MTL_TEST_PAUSE_AT") == step:
        Path(os.environ["MTL_TEST_PAUSE_FILE"]).write_text(step)
        time.sleep(60)


def _umask() -> int:
    """The process umask."""
    try:  # /proc reads it without touching it (os.umask can only read it by setting it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2 (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (so a rename inside it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush one file's bytes to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def recover(parent: str | Path, name: str | None = None, remove: bool = False) -> None:
    """Report (one line each) what interrupted folder writes left in ``parent``; put back a target left missing.

    With ``remove`` (the next write of target ``name``), its leftovers are also deleted.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return
    found = []
    for path in parent.iterdir():
        match = _LEFTOVER.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and name in (None, match["name"]):
            found.append((match["kind"] == "old", path.name, path, match["name"]))
    for is_old, _, path, target_name in sorted(found):  # temporaries first, so each .old below finds its tmp name free
        target = parent / target_name
        what = f"previous copy of '{target_name}' left by an interrupted overwrite" if is_old else \
            "left over from an interrupted export"
        if is_old and not target.exists():
            # the two-rename fallback was killed between its renames: the .old copy is complete, put it back
            try:
                os.rename(path, target)
            except OSError as err:
                warn(f"{path}: {what}, which left {target.name} missing; could not put it back ({err.strerror}): "
                      f"rename it to {target}")
            else:
                warn(f"{target}: was missing after an interrupted overwrite; restored the previous copy {path.name}")
        elif remove:
            warn(f"{path}: {what}; removing it before exporting '{target_name}' again")
            if is_old:  # rename first: a half-deleted folder must never carry a name that recovery would restore
                path = path.rename(path.with_suffix(".tmp"))
            shutil.rmtree(path)
        else:
            warn(f"{path}: {what}; it is ignored and removed by the next export of '{target_name}'")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_failure(path.parent, err, KEPT) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; exported files must be readable as the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # disk full, no permission: one line naming the file; the old one is kept
            raise write_failure(path, err, KEPT) from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=2))


def write_dir_atomic(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` in a temporary folder beside ``target``, then swap it into place.

    An existing ``target`` is replaced by one atomic exchange where Linux allows it, else moved aside to ``.old``
    first (a crash in between is undone by `recover`); the caller decides beforehand whether replacing it is allowed.
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        recover(parent, target.name, remove=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as err:
        raise write_failure(target, err, KEPT) from None
    old = tmp.with_suffix(".old")
    try:
        _pause("tmp_created")
        fill(tmp)
        # mkdtemp makes 0700 and writers such as safetensors 0600: give what others may serve the umask's modes
        umask = _umask()
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        _pause("filled")
        fsync_dir(tmp)
        _pause("synced")
        if not target.exists():
            os.rename(tmp, target)
            _pause("renamed")
        elif _exchange(tmp, target):
            _pause("exchanged")  # target is the new folder, tmp now holds the old one
        else:
            os.rename(target, old)
            _pause("old_moved_aside")  # nothing under the name until the next rename; recover() restores .old
            os.rename(tmp, target)
            _pause("renamed")
        fsync_dir(parent)
        _pause("parent_synced")
        if old.exists():
            os.rename(old, tmp)  # a half-deleted folder must never be called .old (recovery would restore it)
            _pause("old_discarded")
        shutil.rmtree(tmp, ignore_errors=True)
        _pause("done")
    except BaseException as err:
        if old.exists() and not target.exists():
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        # every export passes here: disk full or a folder made read-only is one line naming it, the old folder kept
        if isinstance(err, OSError):
            raise write_failure(target, err, KEPT) from None
        raise
    return target
