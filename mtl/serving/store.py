"""`AdapterStore`: the tasks and fusions a server answers with, indexed from folders mtl writes, weights on demand.

A store is a run folder (``adapters/``, ``fusions/``, ``router/``), a continual stage folder (the same layout) or a
folder of run folders. The first index reads only each part's small JSON config and stats its files (1,000 tasks in
about a second); a weights file is read, checked (`storage.read_tensors_with_sha256`: a truncated file, NaN or
infinity) and hashed when it is first loaded, by the background hasher (`start_hasher`), or by a rescan when it is
new or changed, which is how a broken re-export keeps the old version answering. An answer's version is the SHA-256
of the bytes that were loaded; ``GET /tasks`` lists ``"version": null`` for a part not read yet.

A bad part never stops the rest: one that cannot be read or checked, a task name exported from two folders, a name
that breaks mtl's name rule and a symbolic link out of the store are refused, each with one log line per file state.
`prepare` makes the parts a batch needs resident through `mtl.model_files` (the one loading path), at most
``max_resident`` tasks and fusions, least recently used out first; a resident fusion pins the tasks whose adapters
it fuses. Only the thread that runs the model calls `prepare`; the poller only replaces the index and the loader
thread (`prefetch`) and hasher only read files, so a new export is swapped in between two batches and every answer
comes from one version. Pure Python + torch, no HTTP.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtl import model_files, storage
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from mtl.names import check_name
from mtl.part_pool import PartPool
from mtl.serving.say import printable

log = logging.getLogger("mtl.serving")
Stamp = int  # a hash of (inode, size, mtime) of an export's files: cheap to keep, changes when a file does
Read = tuple["StoreEntry", dict[str, torch.Tensor]]  # an entry with the SHA-256 of the weights read, and the tensors
_SHARED: dict[tuple[str, ...], tuple[str, ...]] = {}  # one copy of each label tuple for the whole index
_PATH, _ERROR = 240, 600  # the longest path and error text a log line shows (a name: 100 characters)
_POOL_TASKS = 4  # evicted tasks whose modules stay pooled between two batches (a batch's evictions come first)


def shown(value: object, limit: int = 100) -> str:
    """``value`` as a log line may hold it: non-printable characters escaped as repr does, the middle of anything
    longer than ``limit`` characters cut (a path keeps its end, the part that names the export)."""
    text = printable(str(value))
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[len(text) - half:]}"


@dataclass(frozen=True, slots=True)  # slots: the index of a large store stays small (no __dict__ per entry)
class StoreEntry:
    """One servable part as the index knows it: where it is, its version, and what a client needs to know."""

    name: str
    kind: str  # "task" or "fusion"
    folder: str  # a str, not a Path: a Path caches its parts, several times the size of the string
    sha256: bytes | None  # the digest (32 bytes) of the weights once read and checked; None until then
    stamp: Stamp
    labels: tuple[str, ...] | None
    adapter: str  # the adapter preset ("pfeiffer", ...) or "fusion"
    fused: tuple[str, ...]  # a fusion's source tasks, in order
    max_length: int
    backbone: str | None
    error: str | None = None  # why this part is not served (its files are broken, or its name is exported twice)
    doc_stride: int = 32  # a tagger's windows of a long text share this many subwords (the spec's stride)

    @property
    def version(self) -> str | None:
        """The SHA-256 prefix of the weights file that answers carry (None until the file has been read)."""
        return None if self.sha256 is None else self.sha256.hex()[:12]

    @property
    def files(self) -> tuple[Path, Path]:
        """The config and weights file."""
        return _files(self.kind, Path(self.folder))

    def describe(self, resident: bool) -> dict[str, Any]:
        """The entry as ``GET /tasks`` lists it (with ``error`` when it is not served)."""
        row = {"task": self.name, "kind": self.kind, "labels": list(self.labels or []), "adapter": self.adapter,
               "fused": list(self.fused), "version": self.version, "resident": resident}
        return {**row, "error": self.error} if self.error else row


def _files(kind: str, folder: Path) -> tuple[Path, Path]:
    if kind == "task":
        return folder / storage.ADAPTER_CONFIG, folder / storage.ADAPTER_WEIGHTS
    return folder / storage.FUSION_CONFIG, folder / storage.FUSION_WEIGHTS


def _stamp(*files: Path) -> Stamp:
    out: list[int] = []
    for file in files:
        try:
            st = os.stat(file)
            out += [st.st_ino, st.st_size, st.st_mtime_ns]
        except OSError:
            out.append(-1)  # missing is a state too: it changes when the file appears
    return hash(tuple(out))


def _escapes(path: Path, root: Path) -> str | None:
    """Why ``path`` leads out of the store (a symbolic link whose target is outside ``root``, itself resolved)."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return f"{shown(path, _PATH)}: a symbolic link that does not resolve, expected a file or folder inside the store"
    if target.is_relative_to(root):
        return None
    return (f"{shown(path, _PATH)}: a symbolic link to {shown(target, _PATH)}, outside the store {shown(root, _PATH)}; "
            "expected one inside it")


def _part_folders(root: Path, real_root: Path) -> tuple[list[tuple[str, Path]], list[tuple[Path, str]]]:
    """(kind, folder) of every completed export under ``root``, and (path, why) of each link out of it that was
    refused; hidden names are temporaries of writes in flight."""
    refused: list[tuple[Path, str]] = []

    def inside(path: Path) -> bool:
        why = _escapes(path, real_root)
        if why is not None:
            refused.append((path, why))
        return why is None

    runs = [root] if (root / "adapters").is_dir() else [
        p for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / "adapters").is_dir() and inside(p)]
    parts: list[tuple[str, Path]] = []
    for run in runs:
        for kind, sub, config in (("task", "adapters", storage.ADAPTER_CONFIG), ("fusion", "fusions", storage.FUSION_CONFIG)):
            base = run / sub
            if base.is_dir() and inside(base):
                # names as strings, one Path per part: a rescan of 1,000 parts every poll_seconds must stay cheap
                with os.scandir(base) as found:
                    names = sorted(e.name for e in found if not e.name.startswith("."))
                parts += [(kind, base / n) for n in names if os.path.isfile(os.path.join(base, n, config))]
    return parts, refused


def _check_name(name: str, what: str, source: Path) -> None:
    try:
        check_name(name, what)
    except MTLConfigError as err:  # the rule's own words, with the name made safe for a log line
        message = str(err).replace(f"'{name}'", f"'{shown(name)}'", 1)
        raise MTLConfigError(f"{source}: {message}") from None


def read_entry(kind: str, folder: Path, root: Path) -> StoreEntry:
    """Index one export folder from its config alone (checked, names by mtl's rule, no link out of ``root``, the
    store resolved); its weights are read and checked later."""
    config, weights = _files(kind, folder)
    for path in (folder, config, weights):
        why = _escapes(path, root)
        if why is not None:
            raise MTLConfigError(why)
    stamp = _stamp(config, weights)  # before the reads: a change during them shows at the next look
    if not weights.is_file():
        raise MTLConfigError(f"{weights}: not found")
    data = storage.read_config(folder, config.name,
                               storage.ADAPTER_SCHEMA if kind == "task" else storage.FUSION_SCHEMA)
    name = data["task"] if kind == "task" else data["fusion"]
    _check_name(name, f"{kind} name", config)
    fused: tuple[str, ...] = ()
    if kind == "fusion":
        for i, adapter in enumerate(data["adapters"]):  # loading reads each one's file: it must be a task's here
            parts = Path(adapter["file"]).parts
            if len(parts) != 3 or parts[0] != "adapters" or parts[2] != storage.ADAPTER_WEIGHTS:
                raise MTLConfigError(f"{config}: adapters[{i}].file is '{shown(adapter['file'])}', expected "
                                     f"adapters/<task>/{storage.ADAPTER_WEIGHTS}")
            _check_name(parts[1], f"adapters[{i}].file's task", config)
        fused = tuple(Path(a["file"]).parts[1] for a in data["adapters"])
    spec = data.get("task_spec") or {}
    labels = tuple(map(sys.intern, data.get("labels") or ()))
    return StoreEntry(
        name=sys.intern(name), kind=kind, folder=str(folder), sha256=None, stamp=stamp,
        labels=_SHARED.setdefault(labels, labels) if labels else None,
        adapter=sys.intern(str(data["adapter"].get("type", "custom"))) if kind == "task" else "fusion",
        fused=fused, max_length=int(spec.get("max_length") or 128), doc_stride=int(spec["doc_stride"] if spec.get("doc_stride") is not None
                                                else int(spec.get("max_length") or 128) // 4),
        backbone=sys.intern(data["backbone"]) if data.get("backbone") else None)


def _read_weights(entry: StoreEntry) -> Read | None:
    """``entry``'s weights read and checked in full, with their SHA-256; None if its files changed since it was
    indexed (the caller indexes them again); the read's one-line error otherwise."""
    config, weights = entry.files
    try:
        sha, tensors = storage.read_tensors_with_sha256(weights)
    except MTLConfigError:
        if _stamp(config, weights) != entry.stamp:
            return None
        raise
    if _stamp(config, weights) != entry.stamp:
        return None
    return dataclasses.replace(entry, sha256=bytes.fromhex(sha)), tensors


def _lower_priority() -> None:
    """Run the calling thread at the lowest CPU priority, so checking files in the background never slows a batch."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: a thread id sets that thread alone
    except (AttributeError, OSError):
        pass  # elsewhere, the pause between files keeps it light


class AdapterStore:
    """The index of a store folder and the parts of it resident in one `MTLModel`."""

    def __init__(self, root: str | Path, max_resident: int = 64, say: Callable[[str], None] | None = None,
                 entries: dict[str, StoreEntry] | None = None) -> None:
        """Index ``root`` (raises a one-line `MTLConfigError` if it holds no servable export; each refused part is
        one line through ``say``); ``entries``: an index made already, e.g. by the process that started this one.
        No weights are read yet."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise MTLConfigError(f"serve.store: {self.root}: not a folder, expected a run folder, a continual stage "
                                 "folder or a folder of run folders")
        if max_resident < 1:
            raise MTLConfigError(f"serve.max_resident: got {max_resident}, expected an int >= 1")
        self.max_resident = max_resident
        self.say = say or (lambda line: log.info(line))
        self._real_root = self.root.resolve()
        self._lock = threading.Lock()  # the one lock: the index, the reports, the prefetch queue
        self._read_done = threading.Condition(self._lock)  # a prefetch read ended, or one was queued
        self._scanning = threading.Lock()  # one scan at a time
        self.entries: dict[str, StoreEntry] = {}
        self.generation = 0  # counts changes of the index (a scan, a part read): a listing is stale when it moved
        self._known: dict[str, StoreEntry] = {}  # folder -> what its files hold, before names are matched up
        self._missing: dict[str, int] = {}
        self._reported: dict[str, Stamp] = {}  # folder -> the broken file state last reported (each said once)
        self._ambiguous: dict[str, tuple[str, ...]] = {}  # name -> the folders exporting it, as last reported
        self.resident_names: tuple[str, ...] = ()  # for other threads: replaced whole after each change
        self.resident: OrderedDict[str, StoreEntry] = OrderedDict()  # least recently used first
        self.model: MTLModel | None = None
        self.pool = PartPool()  # evicted parts' modules, built again for the next loads (the model's thread only)
        # counts since start, for metrics (plain numbers; the model's thread writes them)
        self.stats: dict[str, float] = {"cold_loads": 0, "cold_load_seconds": 0.0, "evictions": 0, "swaps": 0,
                                        "load_failures": 0, "prefetch_hits": 0}
        self.evict_log_seconds = 10.0  # at most one eviction line per this many seconds
        self._evicted_unsaid, self._evictions_said_at = 0, -math.inf
        self.prefetch_limit = 8  # parts queued, and parts read ahead and kept, at most
        self._queue: deque[StoreEntry] = deque()
        self._reading: set[str] = set()  # folders the loader is reading now
        self._read_ahead: OrderedDict[tuple[str, Stamp], Read | MTLConfigError] = OrderedDict()
        self.hash_pause, self.hash_idle = 0.01, 2.0  # seconds between two files, and between two passes
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        problems: list[str] = []
        if entries is None:
            problems = self._scan(initial=True)
            for line in problems:
                self.say(line)
        else:
            self.entries = dict(entries)
            self._known = {e.folder: e for e in entries.values() if e.error is None}
        if not any(e.error is None for e in self.entries.values()):
            if problems or self.entries:
                first = problems[0] if problems else next(iter(self.entries.values())).error
                raise MTLConfigError(f"serve.store: {self.root}: no servable export ({first})")
            raise MTLConfigError(f"serve.store: {self.root}: no exported task found (expected adapters/<task>/"
                                 f"{storage.ADAPTER_CONFIG}, or run folders that hold one)")

    # ---- the index (any thread) ----------------------------------------------------------------
    def scan(self) -> list[str]:
        """Re-read what changed on disk, new and changed parts in full; returns one line per change or refused part
        (each refused file state once). A broken re-export keeps the version read before; a part missing twice in a
        row is removed."""
        return self._scan(initial=False)

    def _scan(self, initial: bool) -> list[str]:
        with self._scanning:
            with self._lock:
                known, old = dict(self._known), dict(self.entries)
            lines: list[str] = []
            parts, refused = _part_folders(self.root, self._real_root)
            for path, why in refused:
                self._once(str(path), hash(why), f"skipped {why}", lines)
            fresh: dict[str, StoreEntry] = {}
            for kind, folder in parts:
                key, before = str(folder), known.get(str(folder))
                stamp = _stamp(*_files(kind, folder))
                if before is not None and before.stamp == stamp:
                    fresh[key] = before
                    continue
                entry, problem = self._read_part(kind, folder, full=not initial)
                if problem is None:
                    fresh[key] = entry
                elif before is not None and before.version is not None and before.error is None and \
                        (entry is None or entry.name == before.name):
                    fresh[key] = before  # the version read before keeps answering
                    self._once(key, stamp, f"kept version {before.version} of '{shown(before.name)}': {problem}", lines)
                elif entry is not None:
                    fresh[key] = dataclasses.replace(entry, error=problem)
                    self._once(key, stamp, f"cannot serve {entry.kind} '{shown(entry.name)}': {problem}", lines)
                else:
                    self._once(key, stamp, f"skipped {shown(folder, _PATH)}: {problem}", lines)
            with self._lock:
                for key, entry in fresh.items():
                    if entry is known.get(key):  # unchanged: keep what loads and the hasher found out meanwhile
                        fresh[key] = self._known[key]
                found = self._by_name(fresh, lines)
                if not initial:
                    lines += self._changes(old, found)
                for name in found:
                    self._missing.pop(name, None)
                for name, entry in old.items():
                    if name not in found:  # an overwrite without an atomic exchange leaves the name empty for a moment
                        self._missing[name] = self._missing.get(name, 0) + 1
                        if self._missing[name] < 2:
                            found[name] = entry
                        else:
                            del self._missing[name]
                            lines.append(f"'{shown(name)}' removed from the store")
                seen = {str(p) for _, p in parts} | {str(p) for p, _ in refused}
                self._reported = {k: v for k, v in self._reported.items() if k in seen}
                if found != self.entries:
                    self.generation += 1
                self._known, self.entries = fresh, found
            return lines

    def _read_part(self, kind: str, folder: Path, full: bool) -> tuple[StoreEntry | None, str | None]:
        """The entry of one export folder (``full``: its weights read and checked too), and what is wrong with it."""
        try:
            entry = read_entry(kind, folder, self._real_root)
        except MTLConfigError as err:
            return None, shown(err, _ERROR)
        if not full:
            return entry, None
        try:
            read = _read_weights(entry)
        except MTLConfigError as err:
            return entry, shown(err, _ERROR)
        return (entry if read is None else read[0]), None  # changed while read: checked when loaded, or next scan

    def _by_name(self, fresh: dict[str, StoreEntry], lines: list[str]) -> dict[str, StoreEntry]:
        """The index by task name; a name exported from several folders is refused (reported once per set)."""
        groups: dict[str, list[StoreEntry]] = {}
        for entry in fresh.values():
            groups.setdefault(entry.name, []).append(entry)
        found = {}
        for name, group in groups.items():
            if len(group) == 1:
                found[name] = group[0]
                if self._ambiguous.pop(name, None):
                    lines.append(f"'{shown(name)}' is exported once again ({shown(group[0].folder, _PATH)}): served")
                continue
            folders = tuple(e.folder for e in group)
            listed = [shown(f, _PATH) for f in folders[:3]] + ([f"{len(folders) - 3} more"] if len(folders) > 3 else [])
            found[name] = dataclasses.replace(group[0], error=(
                f"exported in {len(folders)} folders ({', '.join(listed[:-1])} and {listed[-1]}), expected one "
                "export per task name: remove or rename the copies"))
            if self._ambiguous.get(name) != folders:
                self._ambiguous[name] = folders
                lines.append(f"not serving '{shown(name)}': {found[name].error}")
        for name in [n for n in self._ambiguous if n not in groups]:
            del self._ambiguous[name]
        return found

    @staticmethod
    def _changes(old: dict[str, StoreEntry], found: dict[str, StoreEntry]) -> list[str]:
        """One line per new or replaced part."""
        lines = []
        for name, entry in found.items():
            before = old.get(name)
            if entry.error or (before is not None and (before.folder, before.stamp) == (entry.folder, entry.stamp)):
                continue
            if before is None:
                lines.append(f"new {entry.kind} '{shown(name)}' version {entry.version or 'not read yet'}")
            elif before.sha256 != entry.sha256:
                lines.append(f"'{shown(name)}' version {before.version or 'not read yet'} -> "
                             f"{entry.version or 'not read yet'}")
        return lines

    def _once(self, key: str, stamp: Stamp, line: str, out: list[str] | None = None) -> None:
        """Report a broken file state of ``key`` unless it was reported already (into ``out``, else through say)."""
        with self._lock:
            if self._reported.get(key) == stamp:
                return
            self._reported[key] = stamp
        if out is None:
            self.say(line)
        else:
            out.append(line)

    def _update(self, entry: StoreEntry) -> bool:
        """Record what reading ``entry``'s files found (its SHA-256, or why it cannot be served) in the index, while
        the index holds that file state; True if it did."""
        with self._lock:
            known = self._known.get(entry.folder)
            if known is None or known.stamp != entry.stamp or known.error is not None:
                return False
            self._known[entry.folder] = entry
            current = self.entries.get(entry.name)
            if current is not None and (current.folder, current.stamp) == (entry.folder, entry.stamp) \
                    and current.error is None:
                self.entries[entry.name] = entry
                self.generation += 1
            return True

    def folders_stamp(self) -> Stamp:
        """A stamp of the store's folders (the root, each run, its adapters/ and fusions/): it changes whenever mtl
        exports, replaces or removes a part (each is a rename in one of them), at a few stat calls for any store size;
        a file rewritten in place leaves it unchanged, so only a full `scan` sees that."""
        folders = [self.root]
        if not (self.root / "adapters").is_dir():
            with os.scandir(self.root) as found:
                folders += sorted(Path(e.path) for e in found if not e.name.startswith(".") and e.is_dir())
        return _stamp(*folders, *(f / sub for f in folders for sub in ("adapters", "fusions")))

    def snapshot(self) -> dict[str, StoreEntry]:
        """The index as it is now (a consistent copy)."""
        with self._lock:
            return dict(self.entries)

    def backbone(self) -> str:
        """The one backbone every servable indexed part was trained on."""
        names = {e.backbone for e in self.snapshot().values() if e.error is None}
        if len(names) != 1 or None in names:
            raise MTLConfigError(f"serve.store: {self.root}: parts trained on backbones {sorted(map(str, names))}, "
                                 "expected one (or set serve.backbone)")
        return str(names.pop())

    def describe(self) -> list[dict[str, Any]]:
        """Every indexed part, as ``GET /tasks`` lists it."""
        resident = set(self.resident_names)
        return [e.describe(e.name in resident) for e in self.snapshot().values()]

    # ---- background reads (their own threads; they never touch the model) ---------------------------
    def start_hasher(self) -> None:
        """Read and check, in a low-priority daemon thread, every indexed part not read yet, one file at a time; a
        broken one is then refused (one line). Stops with `close`."""
        self._start("mtl-store-hasher", self._hash_all)

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading and checking, in the loader thread, the weights of the parts ``names`` need that are not
        resident, so that `prepare` only fills them into the model (any thread; unknown names are ignored)."""
        resident = self.resident_names
        with self._lock:  # no snapshot: this runs once per request
            parts = [p for n in names if n in self.entries for p in (*self.entries[n].fused, n)]
            for name in dict.fromkeys(parts):
                entry = self.entries.get(name)
                if entry is None or entry.error or name in resident or len(self._queue) >= self.prefetch_limit \
                        or (entry.folder, entry.stamp) in self._read_ahead or entry.folder in self._reading \
                        or any(q.folder == entry.folder for q in self._queue):
                    continue
                self._queue.append(entry)
            self._read_done.notify_all()
        self._start("mtl-store-loader", self._load_ahead)

    def close(self) -> None:
        """Stop the hasher and the loader (each ends the file it is reading)."""
        self._stop.set()
        with self._lock:
            self._read_done.notify_all()
        for thread in list(self._threads.values()):
            thread.join(timeout=10)

    def _start(self, name: str, target: Callable[[], None]) -> None:
        with self._lock:
            if name not in self._threads and not self._stop.is_set():
                self._threads[name] = threading.Thread(target=target, name=name, daemon=True)
                self._threads[name].start()

    def _hash_all(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            resident = set(self.resident_names)  # a resident part is read already; its re-export, by its swap
            for entry in [e for e in self.snapshot().values() if e.sha256 is None and e.error is None]:
                if self._stop.wait(self.hash_pause):
                    return
                if entry.name in resident:
                    continue
                try:
                    read = _read_weights(entry)
                except MTLConfigError as err:
                    self._refuse(entry, shown(err, _ERROR))
                    continue
                if read is not None:
                    self._update(read[0])
            self._stop.wait(self.hash_idle)

    def _refuse(self, entry: StoreEntry, reason: str) -> None:
        """Stop serving ``entry``'s file state (it cannot be read or loaded), with one line."""
        self._update(dataclasses.replace(entry, error=reason))
        self._once(entry.folder, entry.stamp, f"cannot serve {entry.kind} '{shown(entry.name)}': {reason}")

    def _load_ahead(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    self._read_done.wait()
                if self._stop.is_set():
                    return
                entry = self._queue.popleft()
                self._reading.add(entry.folder)
            result: Read | MTLConfigError | None = None
            try:
                result = _read_weights(entry)
            except MTLConfigError as err:
                result = err  # prepare reports it without reading again
            except Exception:  # noqa: BLE001 - a failed read ahead only means prepare reads the file itself
                result = None
            finally:
                with self._lock:
                    self._reading.discard(entry.folder)
                    if result is not None:
                        self._read_ahead[(entry.folder, entry.stamp)] = result
                        while len(self._read_ahead) > self.prefetch_limit:
                            self._read_ahead.popitem(last=False)
                    self._read_done.notify_all()

    def _take_read_ahead(self, entry: StoreEntry) -> Read | None:
        """What the loader read of ``entry``'s file state (waiting while it reads that folder), or None."""
        with self._lock:
            while entry.folder in self._reading and not self._stop.is_set():
                self._read_done.wait()
            self._queue = deque(q for q in self._queue if q.folder != entry.folder)  # read now by the caller
            result = self._read_ahead.pop((entry.folder, entry.stamp), None)
        if isinstance(result, MTLConfigError):
            raise result
        if result is not None:
            self.stats["prefetch_hits"] += 1
        return result

    # ---- the resident parts (the model's thread only) ----------------------------------------
    def attach(self, model: MTLModel) -> None:
        """Serve through ``model`` (a bare backbone: the store adds and removes its tasks)."""
        if model.tasks:
            raise MTLConfigError(f"the store manages the model's tasks itself, but it already has {model.tasks}")
        self.model = model

    def prepare(self, names: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Make ``names`` (and the tasks their fusions fuse) resident at their indexed versions; returns the version
        each name answers with, and a one-line reason for each name that cannot be served now. Unknown names raise
        `KeyError`."""
        entries = self.snapshot()
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in entries]
        if unknown:
            raise KeyError(unknown[0])
        needed = list(dict.fromkeys([f for n in wanted for f in entries[n].fused] + wanted))
        # a removed or refused part leaves (fusions before their tasks); a re-export replaces its part when needed
        gone = [n for n in self.resident if entries.get(n) is None or entries[n].error is not None]
        gone += [n for n, e in self.resident.items() if n not in gone and any(f in gone for f in e.fused)]
        for name in sorted(gone, key=lambda n: self.resident[n].kind != "fusion"):
            self._unload(name)
        failed: dict[str, str] = {}
        for name in needed:
            entry = entries.get(name)
            broken = [f for f in entry.fused if f in failed] if entry is not None else []
            if entry is None:  # a fusion's task
                reason = "not in the store"
            elif entry.error is not None:
                reason = entry.error
            elif broken:
                reason = f"its fused task '{shown(broken[0])}': {failed[broken[0]]}"
            else:
                reason = self._make_resident(entry, set(needed))
            if reason is not None:
                failed[name] = reason
                continue
            self.resident.move_to_end(name)
        self._evict(set(needed))
        self.pool.trim(keep=2 * _POOL_TASKS)  # a head and an adapter per task
        self._say_evictions()
        self.resident_names = tuple(self.resident)
        return {n: self.resident[n].version for n in wanted if n not in failed}, {n: failed[n] for n in wanted if n in failed}

    def _make_resident(self, entry: StoreEntry, keep: set[str]) -> str | None:
        """Load ``entry`` unless its version is resident (evicting a part not in ``keep`` when full); None, or why
        it cannot be served."""
        current = self.resident.get(entry.name)
        if current is not None and self._current(current, entry):
            return None
        started = time.perf_counter()
        try:
            loaded, tensors = self._read(entry)
        except MTLConfigError as err:
            return self._load_failed(entry, current, shown(err, _ERROR))
        if current is not None:  # a swap: fusions over the old version leave with it
            for name in [n for n, e in self.resident.items() if entry.name in e.fused]:
                self._unload(name)
            self._unload(entry.name)
            self.stats["swaps"] += 1
        # room before the load, once the file is read and checked: the evicted part's modules are the ones it reuses
        self._evict(keep, room=1)
        try:
            if loaded.kind == "task":
                model_files.load_task(self.model, loaded.folder, name=loaded.name, tensors=tensors, pool=self.pool)
            else:
                model_files.load_fusion(self.model, loaded.folder, tensors=tensors)
        except MTLConfigError as err:
            return self._load_failed(loaded, None, shown(err, _ERROR))
        self.resident[loaded.name] = loaded
        self.stats["cold_loads"] += 1
        self.stats["cold_load_seconds"] += time.perf_counter() - started
        self._update(loaded)
        return None

    def _current(self, resident: StoreEntry, entry: StoreEntry) -> bool:
        """The resident version stays: it is the indexed one, the one on disk now (read after the last scan), or a
        re-export of it was found broken already (reported, so not read again)."""
        if (resident.folder, resident.stamp) == (entry.folder, entry.stamp):
            return True
        if resident.folder != entry.folder:
            return False
        now = _stamp(*entry.files)
        return now == resident.stamp or self._reported.get(entry.folder) == now

    def _read(self, entry: StoreEntry) -> Read:
        """``entry``'s weights read and checked (read ahead by the loader when it was); a part re-exported since the
        last scan is indexed again and read as it is now, under its own version."""
        for _ in range(3):
            if _stamp(*entry.files) != entry.stamp:
                fresh = read_entry(entry.kind, Path(entry.folder), self._real_root)
                if fresh.name != entry.name:
                    raise MTLConfigError(f"{shown(entry.folder, _PATH)}: now exports '{shown(fresh.name)}' instead of "
                                         f"'{shown(entry.name)}'; the next scan indexes it")
                entry = fresh
            read = self._take_read_ahead(entry) or _read_weights(entry)
            if read is not None:
                return read
        raise MTLConfigError(f"{entry.files[1]}: changed while it was being read; try again")

    def _load_failed(self, entry: StoreEntry, resident: StoreEntry | None, reason: str) -> str | None:
        """Count and report a failed load (once per file state); the resident version, if any, keeps answering."""
        self.stats["load_failures"] += 1
        if resident is not None:
            self._once(entry.folder, _stamp(*entry.files),
                       f"kept version {resident.version} of '{shown(entry.name)}': {reason}")
            return None
        self._update(dataclasses.replace(entry, error=reason))
        self._once(entry.folder, _stamp(*entry.files), f"cannot load '{shown(entry.name)}': {reason}")
        return reason

    def _unload(self, name: str) -> None:
        self.resident.pop(name)
        if name in self.model.records:
            self.model.remove_task(name, pool=self.pool)

    def _evict(self, keep: set[str], room: int = 0) -> None:
        """Unload the least recently used parts not in ``keep`` (nor fused) until ``room`` more fit."""
        pinned = keep | {f for e in self.resident.values() if e.kind == "fusion" for f in e.fused}
        for name in list(self.resident):
            if len(self.resident) + room <= self.max_resident:
                break
            if name not in pinned:
                self._unload(name)
                self.stats["evictions"] += 1
                self._evicted_unsaid += 1

    def _say_evictions(self) -> None:
        # one line per interval, not per batch: under a mix wider than max_resident every batch evicts
        if self._evicted_unsaid and time.monotonic() - self._evictions_said_at >= self.evict_log_seconds:
            self.say(f"evicted {self._evicted_unsaid} part(s) since the last such line; {len(self.resident)} "
                     f"resident (max_resident {self.max_resident})")
            self._evicted_unsaid, self._evictions_said_at = 0, time.monotonic()
