"""`AdapterStore`: the tasks and fusions a server answers with, indexed from folders mtl writes, weights on demand.

A store is a run folder (``adapters/``, ``fusions/``, ``router/``), a continual stage folder (the same layout) or a
folder of run folders. `scan` reads only each part's small JSON config and the SHA-256 of its weights file (hashed
again only when the file's inode, size or mtime changed), so a store of 1,000 tasks is indexed in seconds.
`prepare` makes the parts a batch needs resident through `mtl.model_files` (the one loading path), at most
``max_resident`` tasks and fusions, least recently used out first; a resident fusion pins the tasks whose adapters
it fuses. Only the thread that runs the model calls `prepare`; the poller thread only replaces the index, so a new
export is swapped in between two batches and every answer comes from one version. Pure Python + torch, no HTTP.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl import model_files, storage
from mtl.errors import MTLConfigError
from mtl.model import MTLModel

log = logging.getLogger("mtl.serving")
Stamp = int  # a hash of (inode, size, mtime) of an export's files: cheap to keep, changes when a file does
_SHARED: dict[tuple[str, ...], tuple[str, ...]] = {}  # one copy of each label tuple for the whole index


@dataclass(frozen=True, slots=True)  # slots: the index of a large store stays small (no __dict__ per entry)
class StoreEntry:
    """One servable part as the index knows it: where it is, its version, and what a client needs to know."""

    name: str
    kind: str  # "task" or "fusion"
    folder: str  # a str, not a Path: a Path caches its parts, several times the size of the string
    sha256: bytes  # the digest (32 bytes), not its 64-character hex
    stamp: Stamp
    labels: tuple[str, ...] | None
    adapter: str  # the adapter preset ("pfeiffer", ...) or "fusion"
    fused: tuple[str, ...]  # a fusion's source tasks, in order
    max_length: int
    backbone: str | None

    @property
    def version(self) -> str:
        """The SHA-256 prefix of the weights file that answers carry."""
        return self.sha256.hex()[:12]

    def describe(self, resident: bool) -> dict[str, Any]:
        """The entry as ``GET /tasks`` lists it."""
        return {"task": self.name, "kind": self.kind, "labels": list(self.labels or []), "adapter": self.adapter,
                "fused": list(self.fused), "version": self.version, "resident": resident}


def _stamp(*files: Path) -> Stamp:
    out: list[int] = []
    for file in files:
        st = file.stat()
        out += [st.st_ino, st.st_size, st.st_mtime_ns]
    return hash(tuple(out))


def _stamp_or_none(folder: Path) -> Stamp:
    """The stamp of every file in an export folder (for telling one broken state from the next)."""
    try:
        return _stamp(*sorted(p for p in folder.iterdir() if p.is_file()))
    except OSError:
        return 0


def _part_folders(root: Path) -> Iterable[tuple[str, Path]]:
    """(kind, folder) of every completed export under ``root``; hidden names are temporaries of writes in flight."""
    runs = [root] if (root / "adapters").is_dir() else sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "adapters").is_dir())
    for run in runs:
        for kind, sub, config in (("task", "adapters", storage.ADAPTER_CONFIG), ("fusion", "fusions", storage.FUSION_CONFIG)):
            base = run / sub
            if base.is_dir():
                yield from ((kind, p) for p in sorted(base.iterdir())
                            if not p.name.startswith(".") and (p / config).is_file())


def read_entry(kind: str, folder: Path, previous: StoreEntry | None = None) -> StoreEntry:
    """Index one export folder: its config (checked) and its weights' SHA-256 (reused while the files are unchanged)."""
    config_name, weights_name, schema = ((storage.ADAPTER_CONFIG, storage.ADAPTER_WEIGHTS, storage.ADAPTER_SCHEMA)
                                         if kind == "task" else
                                         (storage.FUSION_CONFIG, storage.FUSION_WEIGHTS, storage.FUSION_SCHEMA))
    weights = folder / weights_name
    try:
        stamp = _stamp(folder / config_name, weights)
    except OSError:
        raise MTLConfigError(f"{weights}: not found") from None
    if previous is not None and previous.stamp == stamp and previous.folder == str(folder):
        return previous
    data = storage.read_config(folder, config_name, schema)
    # the same read and checks as loading (a truncated file, foreign bytes, NaN or inf): what the index accepts loads
    sha, _ = storage.read_tensors_with_sha256(weights)
    spec = data.get("task_spec") or {}
    return StoreEntry(
        name=data["task"] if kind == "task" else data["fusion"], kind=kind, folder=str(folder),
        sha256=bytes.fromhex(sha), stamp=stamp,
        labels=_SHARED.setdefault(labels, labels) if (labels := tuple(map(sys.intern, data.get("labels") or ()))) else None,
        adapter=sys.intern(str(data["adapter"].get("type", "custom"))) if kind == "task" else "fusion",
        fused=tuple(Path(a["file"]).parts[1] for a in data["adapters"]) if kind == "fusion" else (),
        max_length=int(spec.get("max_length") or 128),
        backbone=sys.intern(data["backbone"]) if data.get("backbone") else None)


class AdapterStore:
    """The index of a store folder and the parts of it resident in one `MTLModel`."""

    def __init__(self, root: str | Path, max_resident: int = 64, say: Callable[[str], None] | None = None,
                 entries: dict[str, StoreEntry] | None = None) -> None:
        """Index ``root`` (raises a one-line `MTLConfigError` if it holds no export; ``entries``: an index made
        already, e.g. by the process that started this one); no weights are loaded yet."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise MTLConfigError(f"serve.store: {self.root}: not a folder, expected a run folder, a continual stage "
                                 "folder or a folder of run folders")
        if max_resident < 1:
            raise MTLConfigError(f"serve.max_resident: got {max_resident}, expected an int >= 1")
        self.max_resident = max_resident
        self.say = say or (lambda line: log.info(line))
        self._lock = threading.Lock()
        self.entries: dict[str, StoreEntry] = {}
        self._missing: dict[str, int] = {}
        self._reported: dict[Path, Stamp] = {}  # broken exports already reported, so a rescan does not repeat them
        self.resident_names: tuple[str, ...] = ()  # for other threads: replaced whole after each change
        self.resident: OrderedDict[str, StoreEntry] = OrderedDict()  # least recently used first
        self.model: MTLModel | None = None
        if entries is None:
            self.scan(strict=True)
        else:
            self.entries = dict(entries)
        if not self.entries:
            raise MTLConfigError(f"serve.store: {self.root}: no exported task found (expected adapters/<task>/"
                                 f"{storage.ADAPTER_CONFIG}, or run folders that hold one)")

    # ---- the index (any thread) ----------------------------------------------------------------
    def scan(self, strict: bool = False) -> list[str]:
        """Re-read the folders; returns one line per change. A part that fails to read keeps its old version
        (``strict``: the first scan refuses a broken store instead); a part missing twice in a row is removed."""
        with self._lock:
            old = dict(self.entries)
        found: dict[str, StoreEntry] = {}
        changes = []
        by_folder = {e.folder: e for e in old.values()}
        for kind, folder in _part_folders(self.root):
            known = by_folder.get(str(folder))
            try:
                entry = read_entry(kind, folder, known)
            except MTLConfigError as err:
                if strict:
                    raise
                if known is not None:
                    found[known.name] = known
                stamp = _stamp_or_none(folder)
                if self._reported.get(folder) != stamp:
                    self._reported[folder] = stamp
                    changes.append(f"kept version {known.version} of '{known.name}': {err}" if known is not None
                                   else f"skipped {folder}: {err}")
                continue
            if entry.name in found:
                message = f"'{entry.name}' is exported twice ({found[entry.name].folder} and {folder})"
                if strict:
                    raise MTLConfigError(f"serve.store: {message}, expected one export per task name")
                changes.append(f"{message}: serving the first")
                continue
            found[entry.name] = entry
            before = old.get(entry.name)
            if before is None:
                changes.append(f"new {entry.kind} '{entry.name}' version {entry.version}")
            elif before.sha256 != entry.sha256:
                changes.append(f"'{entry.name}' version {before.version} -> {entry.version}")
        on_disk = set(found)
        for name, entry in old.items():
            if name not in found:  # an overwrite without an atomic exchange leaves the name empty for a moment
                self._missing[name] = self._missing.get(name, 0) + 1
                if self._missing[name] < 2:
                    found[name] = entry
                else:
                    changes.append(f"'{name}' removed from the store")
        for name in on_disk:
            self._missing.pop(name, None)
        with self._lock:
            self.entries = found
        return changes

    def snapshot(self) -> dict[str, StoreEntry]:
        """The index as it is now (a consistent copy)."""
        with self._lock:
            return dict(self.entries)

    def backbone(self) -> str:
        """The one backbone every indexed part was trained on."""
        names = {e.backbone for e in self.snapshot().values()}
        if len(names) != 1 or None in names:
            raise MTLConfigError(f"serve.store: {self.root}: parts trained on backbones {sorted(map(str, names))}, "
                                 "expected one (or set serve.backbone)")
        return str(names.pop())

    def describe(self) -> list[dict[str, Any]]:
        """Every servable part, as ``GET /tasks`` lists it."""
        resident = set(self.resident_names)
        return [e.describe(e.name in resident) for e in self.snapshot().values()]

    # ---- the resident parts (the model's thread only) ----------------------------------------
    def attach(self, model: MTLModel) -> None:
        """Serve through ``model`` (a bare backbone: the store adds and removes its tasks)."""
        if model.tasks:
            raise MTLConfigError(f"the store manages the model's tasks itself, but it already has {model.tasks}")
        self.model = model

    def prepare(self, names: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Make ``names`` (and the tasks their fusions fuse) resident at their indexed versions; returns the version
        each name answers with, and a one-line error for each name that could not be loaded. Unknown names raise
        `KeyError`."""
        entries = self.snapshot()
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in entries]
        if unknown:
            raise KeyError(unknown[0])
        needed = list(dict.fromkeys(f for n in wanted for f in entries[n].fused)) + wanted
        stale = [n for n, e in self.resident.items() if entries.get(n) is None or entries[n].sha256 != e.sha256]
        stale += [n for n, e in self.resident.items() if any(f in stale for f in e.fused) and n not in stale]
        # a replaced or removed part leaves (fusions before their tasks); the scan that found it logged the change
        for name in sorted(stale, key=lambda n: self.resident[n].kind != "fusion"):
            self._unload(name)
        failed: dict[str, str] = {}
        for name in needed:
            broken = [f for f in entries[name].fused if f in failed]
            if broken:
                failed[name] = failed[broken[0]]
                continue
            if name not in self.resident:
                try:
                    self._load(entries[name])
                except MTLConfigError as err:  # the rest of the batch is still answered
                    failed[name] = str(err)
                    self.say(f"cannot load '{name}': {err}")
                    continue
            self.resident.move_to_end(name)
        self._evict(set(needed))
        self.resident_names = tuple(self.resident)
        return {n: self.resident[n].version for n in wanted if n not in failed}, {n: failed[n] for n in wanted if n in failed}

    def _load(self, entry: StoreEntry) -> None:
        folder = Path(entry.folder)
        weights = folder / (storage.ADAPTER_WEIGHTS if entry.kind == "task" else storage.FUSION_WEIGHTS)
        sha, tensors = storage.read_tensors_with_sha256(weights)
        if bytes.fromhex(sha) != entry.sha256:  # replaced after the scan: serve what was read, under its own version
            entry = read_entry(entry.kind, folder)
            sha, tensors = storage.read_tensors_with_sha256(weights)
            if bytes.fromhex(sha) != entry.sha256:
                raise MTLConfigError(f"{weights}: changed while it was being read; try again")
        if entry.kind == "task":
            model_files.load_task(self.model, folder, tensors=tensors)
        else:
            model_files.load_fusion(self.model, folder, tensors=tensors)
        self.resident[entry.name] = entry

    def _unload(self, name: str) -> None:
        self.resident.pop(name)
        if name in self.model.records:
            self.model.remove_task(name)

    def _evict(self, keep: set[str]) -> None:
        pinned = keep | {f for e in self.resident.values() if e.kind == "fusion" for f in e.fused}
        out = []
        for name in list(self.resident):
            if len(self.resident) <= self.max_resident:
                break
            if name not in pinned:
                self._unload(name)
                out.append(name)
        if out:
            self.say(f"evicted {len(out)} ({', '.join(out[:5])}{', ...' if len(out) > 5 else ''}); "
                     f"{len(self.resident)} resident")
