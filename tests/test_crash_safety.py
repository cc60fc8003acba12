"""Exports survive kill -9 at every step of `mtl.atomic.write_dir_atomic`: old or new under the name, never half, never
none; leftovers are hidden from loaders, reported in one line and cleaned by the next export. No backbone needed."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtl import atomic, storage
from mtl.errors import MTLWriteError

ROOT = Path(__file__).resolve().parents[1]
OLD, NEW, LATER = 1.0, 2.0, 3.0
# the steps write_dir_atomic pauses at, per path through it; the name holds the new folder from the marked step on
STEPS = {
    "new": ["tmp_created", "filled", "synced", "renamed", "parent_synced", "done"],
    "exchange": ["tmp_created", "filled", "synced", "exchanged", "parent_synced", "done"],
    "fallback": ["tmp_created", "filled", "synced", "old_moved_aside", "renamed", "parent_synced", "old_discarded",
                 "done"],
}
SWITCH = {"new": "renamed", "exchange": "exchanged", "fallback": "renamed"}

# Imports torch once, then forks one writer per request (a fresh interpreter per case would cost seconds each).
# The writer runs write_part with the pause hook set; "fallback" makes renameat2 fail with EINVAL.
SERVER = r"""
import ctypes, errno, json, os, sys
import torch
from mtl import atomic, storage

def unsupported(*args):
    ctypes.set_errno(errno.EINVAL)
    return -1

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        result = "finished"
        try:
            os.environ.update(MTL_TEST_PAUSE_AT=job["step"], MTL_TEST_PAUSE_FILE=job["pause"])
            if job["fallback"]:
                atomic._renameat2 = lambda: unsupported
            storage.write_part(job["target"], {"w": torch.full((2, 3), job["value"])},
                               {"task": "keyword", "value": job["value"]}, storage.ADAPTER_WEIGHTS,
                               storage.ADAPTER_CONFIG, overwrite=True)
        except BaseException as err:
            result = f"failed: {err!r}"
        finally:
            with open(job["pause"], "w") as f:
                f.write(result)
            os._exit(0)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def write(folder: Path, value: float) -> Path:
    return storage.write_part(folder, {"w": torch.full((2, 3), value)}, {"task": folder.name, "value": value},
                              storage.ADAPTER_WEIGHTS, storage.ADAPTER_CONFIG, overwrite=True)


def load(folder: Path) -> float:
    """The value a folder was written with; its weights and config must come from the same write."""
    value = storage.read_config(folder, storage.ADAPTER_CONFIG, {"value": (int, float)})["value"]
    assert torch.equal(storage.read_tensors(folder / storage.ADAPTER_WEIGHTS)["w"], torch.full((2, 3), value))
    return value


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def exchange_works(folder: Path) -> bool:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    try:
        return atomic._exchange(folder / "a", folder / "b")
    finally:
        os.rmdir(folder / "a")
        os.rmdir(folder / "b")


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    yield proc
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_at(server: subprocess.Popen, target: Path, step: str, fallback: bool, pause: Path) -> None:
    """Run write_part(target, NEW) in a child process and kill -9 it at ``step``."""
    server.stdin.write(json.dumps({"target": str(target), "step": step, "fallback": fallback, "value": NEW,
                                   "pause": str(pause)}) + "\n")
    server.stdin.flush()
    pid = int(server.stdout.readline())
    try:
        deadline, said = time.monotonic() + 30, ""
        while not said and time.monotonic() < deadline:
            time.sleep(0.002)
            said = pause.read_text() if pause.exists() else ""
        assert said == step, f"the writer did not stop at {step!r}: {said or 'timed out'}"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = int(server.stdout.readline())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("path,step", [(path, step) for path, steps in STEPS.items() for step in steps])
def test_kill_at_every_step_leaves_old_or_new(server, tmp_path, capsys, path, step):
    if path == "exchange" and not exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    run, adapters = tmp_path / "run", tmp_path / "run" / "adapters"
    write(adapters / "other", 7.0)
    if path != "new":
        write(adapters / "keyword", OLD)
    kill_at(server, adapters / "keyword", step, path == "fallback", tmp_path / "paused")
    leftovers = hidden(adapters)
    switched = STEPS[path].index(step) >= STEPS[path].index(SWITCH[path])
    assert bool(leftovers) == (step != "done" and not (path == "new" and switched))

    capsys.readouterr()
    dirs = storage.task_dirs(run)
    lines = capsys.readouterr().err.splitlines()
    expect = NEW if switched else None if path == "new" else OLD
    assert [d.name for d in dirs] == (["keyword", "other"] if expect is not None else ["other"])
    if expect is not None:
        assert load(adapters / "keyword") == expect
    assert load(adapters / "other") == 7.0
    assert len(lines) == len(leftovers)  # one line per leftover, naming it
    assert all(line.startswith("warning: ") for line in lines)
    assert all(sum(name in line for line in lines) == 1 for name in leftovers)

    remaining = hidden(adapters)  # less a .old the loader put back
    write(adapters / "keyword", LATER)
    assert len(capsys.readouterr().err.splitlines()) == len(remaining)  # each removal said once
    assert hidden(adapters) == []
    assert [d.name for d in storage.task_dirs(run)] == ["keyword", "other"]
    assert load(adapters / "keyword") == LATER
    assert capsys.readouterr().err == ""


def test_loader_restores_a_missing_folder_from_its_old_copy(tmp_path, capsys):
    adapters = tmp_path / "adapters"
    write(adapters / "keyword", OLD)
    os.rename(adapters / "keyword", adapters / ".keyword.k3j2ab_9.old")  # the fallback killed between its renames
    assert [d.name for d in storage.task_dirs(tmp_path)] == ["keyword"]
    assert load(adapters / "keyword") == OLD and hidden(adapters) == []
    assert capsys.readouterr().err == (f"warning: {adapters / 'keyword'}: was missing after an interrupted overwrite; "
                                       f"restored the previous copy .keyword.k3j2ab_9.old\n")


def test_loader_says_how_to_restore_when_it_cannot(tmp_path, capsys, monkeypatch):
    adapters = tmp_path / "adapters"
    write(adapters / "other", 7.0)
    write(adapters / "keyword", OLD)
    os.rename(adapters / "keyword", adapters / ".keyword.abc.old")

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), src)

    monkeypatch.setattr(os, "rename", refuse)
    assert [d.name for d in storage.task_dirs(tmp_path)] == ["other"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".keyword.abc.old" in err and f"rename it to {adapters / 'keyword'}" in err


def test_hidden_folders_are_never_loaded(tmp_path, capsys):
    run, adapters = tmp_path / "run", tmp_path / "run" / "adapters"
    write(adapters / "keyword", OLD)
    shutil.copytree(adapters / "keyword", adapters / ".x.tmp")  # hidden, not ours: skipped silently
    shutil.copytree(adapters / "keyword", adapters / ".keyword.k3j2.tmp")
    fusions = run / "fusions"
    fusions.mkdir()
    (fusions / ".mix.k3j2.tmp").mkdir()
    (fusions / ".mix.k3j2.tmp" / storage.FUSION_CONFIG).write_text("{}")
    capsys.readouterr()
    assert [d.name for d in storage.task_dirs(run)] == ["keyword"]
    assert storage.fusion_dirs(run) == []
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {adapters / '.keyword.k3j2.tmp'}: left over from an interrupted export; it is ignored and removed "
        f"by the next export of 'keyword'",
        f"warning: {fusions / '.mix.k3j2.tmp'}: left over from an interrupted export; it is ignored and removed by "
        f"the next export of 'mix'"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_unsupported_exchange_falls_back_to_two_renames(tmp_path, monkeypatch, code):
    calls = []

    def unsupported(*args):
        calls.append(args)
        ctypes.set_errno(code)
        return -1

    write(tmp_path / "keyword", OLD)
    monkeypatch.setattr(atomic, "_renameat2", lambda: unsupported)
    write(tmp_path / "keyword", NEW)
    assert len(calls) == 1 and load(tmp_path / "keyword") == NEW and hidden(tmp_path) == []
    monkeypatch.setattr(atomic, "_renameat2", lambda: None)  # no renameat2 in libc at all
    write(tmp_path / "keyword", LATER)
    assert load(tmp_path / "keyword") == LATER and hidden(tmp_path) == []


def test_other_exchange_errors_are_raised_and_keep_the_old_folder(tmp_path, monkeypatch):
    def denied(*args):
        ctypes.set_errno(errno.EACCES)
        return -1

    write(tmp_path / "keyword", OLD)
    monkeypatch.setattr(atomic, "_renameat2", lambda: denied)
    with pytest.raises(MTLWriteError, match=f"^{tmp_path / 'keyword'}: cannot be written \\(Permission denied at "):
        write(tmp_path / "keyword", NEW)
    assert load(tmp_path / "keyword") == OLD and hidden(tmp_path) == []


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)


def test_a_full_disk_while_exporting_is_one_line_and_keeps_the_old_folder(tmp_path, monkeypatch):
    write(tmp_path / "keyword", OLD)
    monkeypatch.setattr(storage, "save_file", _disk_full)
    with pytest.raises(MTLWriteError) as err:
        write(tmp_path / "keyword", NEW)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'keyword'}: cannot be written (No space left on device at ")
    assert message.endswith("; any previous version is kept, no temporary is left") and "\n" not in message
    assert load(tmp_path / "keyword") == OLD and hidden(tmp_path) == []
    with pytest.raises(MTLWriteError, match=r"new: cannot be written \(No space left on device"):
        write(tmp_path / "new", NEW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyword"]


def test_a_json_file_that_cannot_be_written_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    file = tmp_path / "state.json"
    atomic.write_json_atomic(file, {"completed": 1})

    def fsync(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(MTLWriteError, match=f"^{file}: cannot be written \\(Disk quota exceeded\\)"):
        atomic.write_json_atomic(file, {"completed": 2})
    monkeypatch.undo()
    assert json.loads(file.read_text()) == {"completed": 1} and hidden(tmp_path) == []


def test_renameat2_exchange_works_on_tmp_path(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    assert exchange_works(tmp_path)


def test_exported_files_follow_the_umask(tmp_path):
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    before = os.umask(0o022)
    try:
        shared = write(tmp_path / "shared", OLD)
        atomic.write_text_atomic(tmp_path / "note.txt", "hi")
        assert os.umask(0o077) == 0o022  # reading the umask left it as it was
        private = write(tmp_path / "private", OLD)
        assert os.umask(0o077) == 0o077
    finally:
        os.umask(before)
    assert (mode(shared), mode(shared / storage.ADAPTER_WEIGHTS), mode(shared / storage.ADAPTER_CONFIG)) == \
        (0o755, 0o644, 0o644)
    assert mode(tmp_path / "note.txt") == 0o644
    assert (mode(private), mode(private / storage.ADAPTER_WEIGHTS), mode(private / storage.ADAPTER_CONFIG)) == \
        (0o700, 0o600, 0o600)
