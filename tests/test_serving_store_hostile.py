"""The adapter store against what a store folder can hold by mistake or on purpose: weights read only when needed
(at first load, by the hasher, or ahead by prefetch), a bad part skipped with one line while the rest is served, a
task name exported from two folders, links out of the store, names that break mtl's rule, and the eviction lines and
counters a long-running server reports."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtl import storage
from mtl.backbone import load_tokenizer
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from mtl.names import check_name
from mtl.serving.store import AdapterStore, shown
from tests.serving_helpers import FUSION, TASKS, TEXTS, expected, retrain, store_model, write_store


@pytest.fixture()
def store_dir(tiny_dir, tmp_path):
    return write_store(tmp_path / "store", tiny_dir)


@pytest.fixture()
def reads(monkeypatch) -> list[Path]:
    """Every weights file the store reads (storage.read_tensors_with_sha256), in order."""
    calls, real = [], storage.read_tensors_with_sha256

    def counting(file):
        calls.append(Path(file))
        return real(file)

    monkeypatch.setattr(storage, "read_tensors_with_sha256", counting)
    return calls


def _store(root: Path, tiny_dir: Path, max_resident: int = 8) -> tuple[AdapterStore, list[str]]:
    lines: list[str] = []
    store = AdapterStore(root, max_resident, say=lines.append)
    store.attach(MTLModel(str(tiny_dir)).eval())
    return store, lines


def _scores(store: AdapterStore, text: str, task: str, tiny_dir: Path) -> torch.Tensor:
    """``text`` through ``task`` as the store's model answers it (made resident first)."""
    _, failed = store.prepare([task])
    assert not failed, failed
    tokenizer = load_tokenizer(str(tiny_dir))
    return expected(store.model, tokenizer, text, task, store.snapshot()[task].max_length)


def _weights(root: Path, task: str) -> Path:
    return root / "adapters" / task / storage.ADAPTER_WEIGHTS


def _clone(source: Path, target: Path, **config) -> Path:
    """A copy of the export ``source`` with some keys of its config replaced."""
    shutil.copytree(source, target)
    file = next(target.glob("*_config.json"))
    file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return target


def _with_nan(file: Path) -> None:
    tensors = storage.read_tensors(file)
    tensors["head.out.bias"][0] = float("nan")
    save_file(tensors, str(file))


def _wait(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- lazy reads ------------------------------------------------------------------------------------------------
def test_the_index_reads_no_weights_and_the_first_load_reads_and_hashes_them(store_dir, tiny_dir, reads):
    store, lines = _store(store_dir, tiny_dir)
    assert reads == [] and lines == []
    assert all(row["version"] is None for row in store.describe())
    sha = storage.file_sha256(_weights(store_dir, "t1"))
    versions, failed = store.prepare(["t1"])
    assert versions == {"t1": sha[:12]} and not failed and reads == [_weights(store_dir, "t1")]
    assert {r["task"]: r["version"] for r in store.describe()}["t1"] == sha[:12]
    store.prepare(["t1"])
    assert len(reads) == 1  # resident: not read again
    assert store.scan() == [] and len(reads) == 1  # nothing changed: a rescan reads nothing either


def test_the_hasher_checks_every_part_in_the_background_and_refuses_a_nan_one_once(store_dir, tiny_dir):
    _with_nan(_weights(store_dir, "t2"))  # complete, so only a full read finds it
    store, lines = _store(store_dir, tiny_dir)
    assert lines == [] and "t2" in store.snapshot()
    store.start_hasher()
    try:
        _wait(lambda: all(e.version or e.error for e in store.snapshot().values()))
    finally:
        store.close()
    assert store._threads and not any(t.is_alive() for t in store._threads.values())  # stopped (other tests' stores
    # may still have theirs)
    entries = store.snapshot()
    assert entries["t2"].error and "head.out.bias" in entries["t2"].error and entries["t2"].version is None
    assert entries["t0"].version == storage.file_sha256(_weights(store_dir, "t0"))[:12]
    assert len(lines) == 1 and lines[0].startswith("cannot serve task 't2': ") and "non-finite" in lines[0]
    _, failed = store.prepare(["t2", "t3"])
    assert list(failed) == ["t2"] and "head.out.bias" in failed["t2"] and "\n" not in failed["t2"]
    assert store.scan() == [] and store.scan() == [] and len(lines) == 1  # reported once
    assert {r["task"]: r.get("error") for r in store.describe()}["t2"] == entries["t2"].error


# ---- one bad part --------------------------------------------------------------------------------------------
def test_a_bad_part_is_skipped_with_one_line_at_start_and_the_rest_is_served(store_dir, tiny_dir, reads):
    (store_dir / "adapters" / "t0" / storage.ADAPTER_CONFIG).write_text("{not json")
    weights = _weights(store_dir, "t3")
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: found at its first load
    store, lines = _store(store_dir, tiny_dir)
    assert len(lines) == 1 and lines[0].startswith(f"skipped {store_dir / 'adapters' / 't0'}: ")
    assert "not valid JSON" in lines[0] and "t0" not in store.snapshot() and "t3" in store.snapshot()
    versions, failed = store.prepare(["t1", "t3"])
    assert list(versions) == ["t1"] and "not a readable safetensors file" in failed["t3"]
    assert len(lines) == 2 and lines[1].startswith("cannot load 't3': ")
    for _ in range(3):  # neither a batch nor a rescan repeats it, or reads the file again
        assert store.prepare(["t3"])[1] == failed and store.scan() == []
    assert len(lines) == 2 and reads.count(weights) == 1
    assert store.stats["load_failures"] == 1


def test_a_bad_part_while_running_is_skipped_with_one_line_and_the_rest_is_served(store_dir, tiny_dir):
    store, lines = _store(store_dir, tiny_dir)
    before = _scores(store, TEXTS[0], "t2", tiny_dir)
    bad = _clone(store_dir / "adapters" / "t2", store_dir / "adapters" / "t9", task="t9")
    (bad / storage.ADAPTER_WEIGHTS).write_bytes((bad / storage.ADAPTER_WEIGHTS).read_bytes()[:50])
    changes = store.scan()  # a new part is read in full by the scan that finds it
    assert len(changes) == 1 and changes[0].startswith("cannot serve task 't9': ") and "not a readable" in changes[0]
    assert store.scan() == [] and store.scan() == []
    assert "not a readable" in store.prepare(["t9"])[1]["t9"] and lines == []  # known broken: no new line
    (store_dir / "adapters" / "t1" / storage.ADAPTER_CONFIG).write_text("[]")  # never loaded: nothing to keep
    changes = store.scan()
    assert len(changes) == 1 and changes[0].startswith(f"skipped {store_dir / 'adapters' / 't1'}: ")
    assert torch.equal(_scores(store, TEXTS[0], "t2", tiny_dir), before)


def test_a_store_with_no_servable_part_is_refused_in_one_line(store_dir, tmp_path):
    only = tmp_path / "only"
    shutil.copytree(store_dir / "adapters" / "t0", only / "adapters" / "t0")
    (only / "adapters" / "t0" / storage.ADAPTER_CONFIG).write_text("{")
    with pytest.raises(MTLConfigError, match=r"no servable export \(skipped .*t0: .*not valid JSON") as err:
        AdapterStore(only, say=lambda line: None)
    assert "\n" not in str(err.value)


def test_a_re_export_found_broken_when_it_is_loaded_keeps_the_old_version(store_dir, tiny_dir, reads):
    store, lines = _store(store_dir, tiny_dir)
    old_scores, (old, _) = _scores(store, TEXTS[1], "t1", tiny_dir), store.prepare(["t1"])
    retrain(store_dir, tiny_dir, "t1", seed=5)
    assert store.scan() == [f"'t1' version {old['t1']} -> {storage.file_sha256(_weights(store_dir, 't1'))[:12]}"]
    weights = _weights(store_dir, "t1")
    weights.write_bytes(weights.read_bytes()[:-10])  # broken again before the next batch
    count = len(reads)
    assert store.prepare(["t1"]) == (old, {})
    assert len(lines) == 1 and lines[0].startswith(f"kept version {old['t1']} of 't1': ")
    assert store.prepare(["t1"]) == (old, {}) and len(reads) == count + 1  # reported broken: not read again
    assert torch.equal(_scores(store, TEXTS[1], "t1", tiny_dir), old_scores) and len(lines) == 1


# ---- a name in two folders ------------------------------------------------------------------------------------
def test_a_name_exported_from_two_folders_is_refused_naming_both_and_logged_once(store_dir, tiny_dir):
    shutil.copytree(store_dir / "adapters" / "t1", store_dir / "adapters" / "t1_copy")  # its config still says t1
    store, lines = _store(store_dir, tiny_dir)
    first, second = store_dir / "adapters" / "t1", store_dir / "adapters" / "t1_copy"
    assert len(lines) == 1 and lines[0].startswith("not serving 't1': exported in 2 folders")
    assert str(first) in lines[0] and str(second) in lines[0]
    _, failed = store.prepare(["t1", "t2", FUSION])
    assert sorted(failed) == sorted(["t1", FUSION]) and str(first) in failed["t1"] and str(second) in failed["t1"]
    assert failed[FUSION].startswith("its fused task 't1': exported in 2 folders")
    assert "error" in {r["task"]: r for r in store.describe()}["t1"]
    for _ in range(3):  # the poller rescans every 2 s: said once
        assert store.scan() == []
    assert len(lines) == 1
    shutil.rmtree(second)
    assert store.scan() == [f"'t1' is exported once again ({first}): served"]
    versions, failed = store.prepare(["t1", FUSION])
    assert not failed and versions["t1"] == storage.file_sha256(_weights(store_dir, "t1"))[:12]


def test_a_copy_made_while_running_unloads_the_name_until_it_is_gone(store_dir, tiny_dir):
    store, _ = _store(store_dir, tiny_dir)
    store.prepare(["t2"])
    shutil.copytree(store_dir / "adapters" / "t2", store_dir / "adapters" / "bbc_copy")
    changes = store.scan()
    assert len(changes) == 1 and changes[0].startswith("not serving 't2': exported in 2 folders")
    assert "exported in 2 folders" in store.prepare(["t2"])[1]["t2"] and "t2" not in store.resident_names
    assert store.scan() == []


# ---- links ----------------------------------------------------------------------------------------------------
def test_links_out_of_the_store_are_refused_and_links_inside_it_are_served(tmp_path, tiny_dir):
    outside = write_store(tmp_path / "outside", tiny_dir)
    root = tmp_path / "root"
    run = write_store(root / "run_a", tiny_dir)
    (root / "run_out").symlink_to(outside, target_is_directory=True)  # a whole run: would make every name ambiguous
    (run / "adapters" / "t5").symlink_to(outside / "adapters" / "t0", target_is_directory=True)
    t6 = _clone(run / "adapters" / "t2", run / "adapters" / "t6", task="t6", adapter_name="t6")
    (t6 / storage.ADAPTER_WEIGHTS).unlink()
    (t6 / storage.ADAPTER_WEIGHTS).symlink_to(_weights(outside, "t2"))
    _clone(run / "adapters" / "t3", root / "stash" / "t7", task="t7", adapter_name="t7")  # stash/: not a run folder
    (run / "adapters" / "t7").symlink_to(Path("..", "..", "stash", "t7"), target_is_directory=True)
    store, lines = _store(root, tiny_dir)
    refused = [root / "run_out", run / "adapters" / "t5", t6 / storage.ADAPTER_WEIGHTS]
    assert len(lines) == 3 and all(f"{path}: a symbolic link to " in "".join(lines) for path in refused)
    assert all("outside the store" in line for line in lines)
    assert sorted(store.snapshot()) == sorted([*TASKS, FUSION, "t7"])
    assert torch.equal(_scores(store, TEXTS[2], "t7", tiny_dir), _scores(store, TEXTS[2], "t3", tiny_dir))
    assert store.scan() == [] and len(lines) == 3


def test_a_store_given_through_a_link_serves_what_is_inside_it(store_dir, tiny_dir, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(store_dir, target_is_directory=True)  # "current" -> the latest run, as deployments do
    store, lines = _store(link, tiny_dir)
    assert lines == [] and sorted(store.snapshot()) == sorted([*TASKS, FUSION])


# ---- names ----------------------------------------------------------------------------------------------------
BAD_NAMES = ["../../escape", "bad\x00name", "a" * 5000, "evil\nname", "t5\n", "\x1b[31mred", "train", ""]


def test_names_that_break_the_name_rule_are_skipped_with_lines_free_of_control_characters(store_dir, tiny_dir):
    for i, name in enumerate(BAD_NAMES):
        _clone(store_dir / "adapters" / "t0", store_dir / "adapters" / f"bad{i}", task=name)
    config = json.loads((store_dir / "fusions" / FUSION / storage.FUSION_CONFIG).read_text())
    config["adapters"][0]["file"] = "adapters/../../../outside/adapter.safetensors"
    _clone(store_dir / "fusions" / FUSION, store_dir / "fusions" / "fbad", fusion="fbad", adapters=config["adapters"])
    (store_dir / "adapters" / "new\nline\x1b").mkdir()
    (store_dir / "adapters" / "new\nline\x1b" / storage.ADAPTER_CONFIG).write_text("{")
    store, lines = _store(store_dir, tiny_dir)
    assert len(lines) == len(BAD_NAMES) + 2
    assert all(line.isprintable() and len(line) < 800 and line.startswith("skipped ") for line in lines)
    assert sum("is invalid" in line for line in lines) == len(BAD_NAMES) - 1 and "is reserved" in "".join(lines)
    assert "bad\\x00name" in "".join(lines) and "adapters[0].file" in "".join(lines)
    assert sorted(store.snapshot()) == sorted([*TASKS, FUSION])
    assert store.scan() == [] and len(lines) == len(BAD_NAMES) + 2


def test_the_name_rule_and_the_log_helper():
    for name in BAD_NAMES:
        with pytest.raises(MTLConfigError):
            check_name(name, "task name")
    check_name("a" * 255, "task name")
    with pytest.raises(MTLConfigError, match="expected 1-255 letters"):
        check_name("a" * 256, "task name")
    assert shown("a\x00b\nc") == "a\\x00b\\nc" and len(shown("x" * 5000)) <= 100
    assert shown("/" + "d" * 200 + "/t0", limit=40).endswith("dd/t0")  # a path keeps the end that names the part


# ---- eviction lines and counters --------------------------------------------------------------------------------
def test_evictions_are_one_line_per_interval_and_every_load_is_counted(store_dir, tiny_dir):
    store, lines = _store(store_dir, tiny_dir, max_resident=1)
    for task in TASKS:
        store.prepare([task])
    evicted = [line for line in lines if line.startswith("evicted")]
    assert evicted == ["evicted 1 part(s) since the last such line; 1 resident (max_resident 1)"]
    assert store.stats["evictions"] == 3 and store.stats["cold_loads"] == 4 and len(store.resident_names) == 1
    store.evict_log_seconds = 0.0
    store.prepare(["t0"])
    assert lines[-1] == "evicted 3 part(s) since the last such line; 1 resident (max_resident 1)"
    retrain(store_dir, tiny_dir, "t0", seed=7)
    store.scan()
    store.prepare(["t0"])
    weights = _weights(store_dir, "t1")
    weights.write_bytes(weights.read_bytes()[:20])
    store.prepare(["t1"])
    stats = store.stats
    assert (stats["cold_loads"], stats["evictions"], stats["swaps"], stats["load_failures"]) == (6, 4, 1, 1)
    assert stats["cold_load_seconds"] > 0 and all(isinstance(v, (int, float)) for v in stats.values())


# ---- prefetch -------------------------------------------------------------------------------------------------
def test_a_prefetched_part_loads_without_reading_its_file_again_and_answers_the_same(store_dir, tiny_dir, reads):
    store, _ = _store(store_dir, tiny_dir)
    store.prefetch(["t1", FUSION, "unknown"])  # the fusion brings its tasks t0 and t1
    _wait(lambda: len(reads) == 3)
    assert sorted(p.parent.name for p in reads) == sorted(["t0", "t1", FUSION])
    reference, tokenizer = store_model(store_dir, tiny_dir), load_tokenizer(str(tiny_dir))
    for task in ["t1", FUSION]:
        assert torch.allclose(_scores(store, TEXTS[0], task, tiny_dir),
                              expected(reference, tokenizer, TEXTS[0], task, 32), atol=1e-6)
    assert len(reads) == 3 and store.stats["prefetch_hits"] == 3 and store.stats["cold_loads"] == 3
    sha = storage.file_sha256(_weights(store_dir, "t1"))
    assert store.prepare(["t1"])[0] == {"t1": sha[:12]}
    store.prefetch(["t1"])  # resident: nothing to read
    time.sleep(0.1)
    assert len(reads) == 3
    store.close()


def test_a_file_changed_after_its_prefetch_is_read_again(store_dir, tiny_dir, reads):
    store, _ = _store(store_dir, tiny_dir)
    store.prefetch(["t2"])
    _wait(lambda: len(reads) == 1)
    retrain(store_dir, tiny_dir, "t2", seed=11)  # no rescan in between
    versions, _ = store.prepare(["t2"])
    assert len(reads) == 2 and store.stats["prefetch_hits"] == 0
    assert versions == {"t2": storage.file_sha256(_weights(store_dir, "t2"))[:12]}
    want = expected(store_model(store_dir, tiny_dir), load_tokenizer(str(tiny_dir)), TEXTS[3], "t2", 8)
    assert torch.allclose(_scores(store, TEXTS[3], "t2", tiny_dir), want, atol=1e-6)
    store.close()


def test_prepare_waits_for_a_prefetch_in_progress_instead_of_reading_twice(store_dir, tiny_dir, reads, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    counting = storage.read_tensors_with_sha256

    def slow(file):
        if threading.current_thread().name == "mtl-store-loader":
            entered.set()
            release.wait(20)
        return counting(file)

    monkeypatch.setattr(storage, "read_tensors_with_sha256", slow)
    store, _ = _store(store_dir, tiny_dir)
    store.prefetch(["t3"])
    assert entered.wait(20)
    done: list = []
    model_thread = threading.Thread(target=lambda: done.append(store.prepare(["t3"])))
    model_thread.start()
    time.sleep(0.3)
    assert model_thread.is_alive() and not done  # waiting for the loader, not reading the file itself
    release.set()
    model_thread.join(20)
    assert done and not done[0][1] and len(reads) == 1 and store.stats["prefetch_hits"] == 1
    store.close()


def test_a_broken_file_read_ahead_fails_its_load_without_a_second_read(store_dir, tiny_dir, reads):
    weights = _weights(store_dir, "t0")
    weights.write_bytes(weights.read_bytes()[:-1])
    store, lines = _store(store_dir, tiny_dir)
    store.prefetch(["t0"])
    _wait(lambda: len(reads) == 1)
    _, failed = store.prepare(["t0"])
    assert "not a readable safetensors file" in failed["t0"] and len(reads) == 1 and len(lines) == 1
    store.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priority is Linux's")
def test_the_hasher_runs_at_low_priority(store_dir, tiny_dir, monkeypatch):
    store, _ = _store(store_dir, tiny_dir)
    seen: list[int] = []
    real = storage.read_tensors_with_sha256

    def spy(file):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(file)

    monkeypatch.setattr(storage, "read_tensors_with_sha256", spy)
    store.start_hasher()
    try:
        _wait(lambda: all(e.version for e in store.snapshot().values()))
    finally:
        store.close()
    assert seen and all(p == 19 for p in seen) and os.getpriority(os.PRIO_PROCESS, 0) != 19
