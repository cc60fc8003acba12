"""Serving under load: ``train.py serve`` on MiniLM-L6 with many Pfeiffer adapters, real HTTP on 127.0.0.1.

Usage: python benchmarks/serving.py [--quick] [--tasks 64] [--big-store 1000] [--max-resident 64] [--requests 2000]
       [--clients 32] [--seconds 30] [--reps 4] [--threads N] [--swap-every 10] [--cold-loads 50] [--zipf 1.1]

Servers run with serve's own defaults (what a user of ``configs/serve.yaml`` gets: torch's threads, precision auto)
unless ``--threads`` is given. Stores are written with `mtl.model_files.save_task` into a temporary folder (deleted
at the end): ``--tasks`` tasks (Pfeiffer adapters and 3-label heads with random non-zero weights) and a second store
of ``--big-store`` tasks. Each client is a thread with one keep-alive `http.client` connection sending one short text
(10-40 words) per request; a run stops after ``--requests`` requests or ``--seconds`` seconds, whichever comes first.
Scenarios:

- (a) every request for one task, on the default server and on one with ``--serve.threads 1``;
- (b) a uniform mix over the ``--tasks`` tasks (``max_resident`` = task count); no batching: (b) on
  ``--serve.max_batch_size 1``; swap per task: (b) on a server whose API (`SwapPerTaskAPI`, defined here; the
  product code is unchanged) splits each gathered batch by task and runs one forward per task, what a
  one-active-adapter design (peft's ``set_adapter``) forces;
- (c) the big store with ``max_resident`` 64: a Zipf(``--zipf``) mix over its tasks, cold loads included, and a
  stream whose every request names a task not resident. Before any server starts, in process: the index time of
  the big store, the cold-load time of one adapter (`AdapterStore.prepare` of a non-resident task) with the file read
  in `prepare` and after `AdapterStore.prefetch`, and the index size per task (the Python heap an index keeps, by
  tracemalloc; its pickle; the worker's RSS difference per task). Idle CPU of the whole server (every process, after
  the background hasher is done) over 10 s;
- (d) (b) with a hot swap every ``--swap-every`` s: one task re-exported with new weights (``overwrite=True``)
  while the load runs; every answer's version must be one of its task's exported versions.

Every server of (a)-(c) runs at once and the runs alternate, repeated ``--reps`` times; each figure is the median
over the repetitions, and the ratios are medians of per-repetition ratios with their range. Every server is stopped
(POST /shutdown with the admin key, then a kill of its process group) even on error. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import itertools
import json
import os
import pickle
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl import model_files, storage
from mtl.model import MTLModel
from mtl.serving.api import AdapterServingAPI
from mtl.serving.store import AdapterStore, StoreEntry

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "minilm-l6"
LABELS = ["negative", "neutral", "positive"]
ADMIN = "bench-admin-key"
SUBJECTS = ["the council", "our team", "a local farmer", "the new museum", "her brother", "the airline", "students",
            "the central bank", "a small startup", "the orchestra", "fans", "the mayor", "scientists", "the club",
            "my neighbour", "the hospital", "a group of nurses", "the city library"]
VERBS = ["announced", "criticised", "opened", "delayed", "celebrated", "rejected", "reported", "launched",
         "questioned", "won", "lost", "cancelled", "praised", "reviewed", "postponed", "defended"]
OBJECTS = ["a plan for the river park", "the final match of the season", "record profits for the second quarter",
           "a late-night concert in the old square", "the new budget", "plans to cut fares on the night buses",
           "a study on sleep and memory", "the winter festival", "its first electric bus", "the league title",
           "an exhibition of old maps", "the school closures", "a deal with the union over pay"]
TAILS = ["on Monday", "after a long debate", "despite the rain", "for the third year in a row", "to mixed reviews",
         "in a short statement", "earlier than expected", "last night", "this week", "and nobody seemed surprised",
         "which angered many residents", "although the details are still unclear", "to loud applause"]


# ---- inputs and stores -------------------------------------------------------------------------------------------
def make_texts(count: int, seed: int = 0) -> list[str]:
    """Short news-like texts of 10 to 40 words."""
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        target, words = rng.randint(10, 40), []
        while len(words) < target:
            words += f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}".split()
        texts.append(" ".join(words[:target]).capitalize() + ".")
    return texts


def weights_version(folder: Path) -> str:
    """The version an answer carries for the export in ``folder`` (SHA-256 prefix of its weights file)."""
    return storage.file_sha256(folder / storage.ADAPTER_WEIGHTS)[:12]


def randomize(model: MTLModel, task: str, seed: int) -> None:
    """Random non-zero adapter and head weights, different for every task and seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.task_parameters(task).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def write_store(root: Path, names: list[str], model: MTLModel, keep: bool) -> dict[str, set[str]]:
    """Export every task of ``names`` under ``root/adapters``; returns each task's exported versions. ``keep``: leave
    the tasks in ``model`` (for re-exporting them later), otherwise remove each after its export."""
    versions = {}
    for i, name in enumerate(names):
        model.add_task(name, len(LABELS), "pfeiffer", labels=LABELS, spec={"max_length": 128})
        randomize(model, name, seed=i)
        folder = model_files.save_task(model, name, root / "adapters")
        versions[name] = {weights_version(folder)}
        if not keep:
            model.remove_task(name)
    return versions


def zipf_sampler(count: int, exponent: float, rng: random.Random) -> Any:
    """A function drawing a rank in [0, count) with P(k) proportional to 1 / (k + 1) ** exponent."""
    cumulative = list(itertools.accumulate(1.0 / (k + 1) ** exponent for k in range(count)))
    return lambda: min(bisect.bisect_left(cumulative, rng.random() * cumulative[-1]), count - 1)


# ---- servers -----------------------------------------------------------------------------------------------------
class SwapPerTaskAPI(AdapterServingAPI):
    """Baseline: each gathered batch split by task, one forward per task (one active adapter at a time), rows put
    back in their order. Everything else is the product's API."""

    def _forward(self, rows: list[tuple[int, str, str]], entries: dict[str, StoreEntry]) -> list[torch.Tensor]:
        """One product forward per task group, reassembled in row order."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        for task in dict.fromkeys(task for _, _, task in rows):
            index = [k for k, row in enumerate(rows) if row[2] == task]
            for k, logits in zip(index, super()._forward([rows[k] for k in index], entries)):
                out[k] = logits
        return out  # type: ignore[return-value]


BASELINES = {"swap": SwapPerTaskAPI}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process started by this script (its own process group) and its log."""

    name: str
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def base(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"


def start_server(name: str, store: Path, log: Path, threads: int | None, max_resident: int, max_batch_size: int = 32,
                 baseline: str | None = None) -> Server:
    """Start ``train.py serve`` on a free port, or with ``baseline`` (a key of `BASELINES`) this script serving that
    API through the product's `build_server`."""
    port = free_port()
    settings = {"store": str(store), "port": port, "max_resident": max_resident, "max_batch_size": max_batch_size,
                "admin_key": ADMIN, **({"threads": threads} if threads else {})}
    if baseline:
        command = [sys.executable, str(Path(__file__).resolve()), "--baseline-server", baseline, json.dumps(settings)]
    else:
        command = [sys.executable, str(ROOT / "train.py"), "serve"] + [
            a for k, v in settings.items() for a in (f"--serve.{k}", str(v))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIT_SHUTDOWN_API_KEY": ADMIN}
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    return Server(name, process, port, log)


def get(url: str, timeout: float = 5.0) -> int:
    """Status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except Exception:  # noqa: BLE001 - not up yet
        return 0


def wait_ready(server: Server, limit: float = 300.0) -> None:
    """Wait until the server answers /ready (the worker has loaded the model), bounded in time."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server {server.name} exited ({server.process.returncode}):\n"
                               f"{server.log.read_text()[-3000:]}")
        if get(f"{server.base}/ready") == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"server {server.name} not ready after {limit:.0f} s:\n{server.log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    """POST /shutdown with the admin key, wait, then kill whatever of its process group is left."""
    if server.process.poll() is None:
        try:
            request = urllib.request.Request(f"{server.base}/shutdown", data=b"", method="POST",
                                             headers={"Authorization": f"Bearer {ADMIN}"})
            urllib.request.urlopen(request, timeout=10).read()
        except Exception:  # noqa: BLE001 - it is killed below anyway
            pass
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.process.pid, signal.SIGKILL)  # its own group (start_new_session): workers left behind too
    except (ProcessLookupError, PermissionError):
        pass
    if server.process.poll() is None:
        server.process.kill()
    server.process.wait(timeout=30)


def serve_baseline(kind: str, settings: dict[str, Any]) -> None:
    """Run ``train.py serve``'s own start-up with a `BASELINES` API (what ``--baseline-server`` starts)."""
    from mtl.serving.cli import serve_main  # noqa: PLC0415

    print(f"baseline server ({BASELINES[kind].__name__}) on 127.0.0.1:{settings['port']}", flush=True)
    serve_main([a for k, v in settings.items() for a in (f"--serve.{k}", str(v))], api_class=BASELINES[kind])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc/*/stat parent ids."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def rss_mib(pid: int) -> float:
    """VmRSS of one process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_rss(server: Server) -> float:
    """RSS (MiB) of the server's inference worker: the spawned child (``spawn_main``, not the resource tracker)."""
    found = []
    for pid in descendants(server.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
                found.append(rss_mib(pid))
        except OSError:
            continue
    if not found:
        raise RuntimeError(f"no inference worker found below pid {server.process.pid}")
    return max(found)


# ---- load --------------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """What one bounded load run saw."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    bad_versions: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    versions: dict[str, set[str]] = field(default_factory=dict)  # versions each task answered with

    @property
    def rate(self) -> float:
        """Answered requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile in ms (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_load(server: Server, jobs: list[tuple[str, str]], clients: int, max_requests: int, max_seconds: float,
             exported: dict[str, set[str]] | None = None) -> LoadResult:
    """``clients`` threads, each with one keep-alive connection, send ``jobs`` in order (cycled) until
    ``max_requests`` are sent or ``max_seconds`` have passed; every thread stops by itself. ``exported``: the
    versions each task may answer with (checked after the run, so versions exported during it count)."""
    result, lock, counter = LoadResult(), threading.Lock(), itertools.count()
    answers: list[tuple[str, str]] = []
    start = time.perf_counter()
    deadline = start + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            while time.perf_counter() < deadline:
                i = next(counter)
                if i >= max_requests:
                    return
                text, task = jobs[i % len(jobs)]
                body = json.dumps({"text": text, "task": task})
                sent = time.perf_counter()
                try:
                    connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    data = response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as err:
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                    status, data = 0, f"{type(err).__name__}: {err}".encode()
                took = time.perf_counter() - sent
                with lock:
                    result.sent += 1
                    if status == 200:
                        answer = json.loads(data)
                        result.ok += 1
                        result.latencies.append(took)
                        answers.append((answer["task"], answer["version"]))
                        if answer["task"] != task:
                            result.failed += 1
                            result.errors.append(f"asked {task}, answered {answer['task']}")
                    else:
                        result.failed += 1
                        if len(result.errors) < 5:
                            result.errors.append(f"{status}: {data[:200]!r}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, name=f"client-{c}", daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_seconds + 120)  # a request times out after 60 s, so this only bounds a broken client
    result.seconds = time.perf_counter() - start
    for task, version in answers:
        result.versions.setdefault(task, set()).add(version)
        if exported is not None and version not in exported.get(task, set()):
            result.bad_versions += 1
    return result


def warm_up(server: Server, tasks: list[str], texts: list[str]) -> None:
    """One request per task (so they are resident) and a few more, unmeasured; any failure stops the benchmark."""
    jobs = [(texts[i % len(texts)], task) for i, task in enumerate(tasks)]
    result = run_load(server, jobs, clients=4, max_requests=len(jobs) + 8, max_seconds=300)
    if result.failed:
        raise RuntimeError(f"warm-up of {server.name} failed: {result.errors}")


@dataclass
class Scenario:
    """Repeated runs of one scenario."""

    label: str
    runs: list[LoadResult] = field(default_factory=list)

    def median(self, key: Any) -> float:
        """Median of ``key(run)`` over the runs."""
        return statistics.median(key(r) for r in self.runs)

    @property
    def rate(self) -> float:
        """Median requests/s."""
        return self.median(lambda r: r.rate)

    def row(self, reference: float | None) -> str:
        """The scenario's table row; ``reference``: the (b) rate for the last column."""
        sent, failed = sum(r.sent for r in self.runs), sum(r.failed for r in self.runs)
        bad = sum(r.bad_versions for r in self.runs)
        ratio = f"{self.rate / reference:.2f}x" if reference else "-"
        return (f"| {self.label} | {len(self.runs)} | {sent:,} | {failed} | {bad} | {self.rate:.1f} | "
                f"{self.median(lambda r: r.percentile(50)):.0f} | {self.median(lambda r: r.percentile(95)):.0f} | "
                f"{self.median(lambda r: r.percentile(99)):.0f} | {ratio} |")


def progress(line: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def describe_run(label: str, r: LoadResult) -> None:
    """One progress line for a finished run."""
    progress(f"  {label}: {r.ok}/{r.sent} ok in {r.seconds:.1f} s = {r.rate:.1f} req/s, p50 {r.percentile(50):.0f} ms,"
             f" p99 {r.percentile(99):.0f} ms, failed {r.failed}, bad versions {r.bad_versions}"
             + (f"; errors {r.errors[:3]}" if r.errors else ""))


# ---- the benchmark -----------------------------------------------------------------------------------------------
def hot_swap_run(server: Server, jobs: list[tuple[str, str]], model: MTLModel, store: Path, tasks: list[str],
                 exported: dict[str, set[str]], args: argparse.Namespace) -> tuple[LoadResult, int, float]:
    """(d): the uniform load for 3.5 x ``swap_every`` s while a thread re-exports one task (another each time) at
    1, 2 and 3 x ``swap_every`` s; returns the run, the number of swaps and the slowest export (s)."""
    stop, swaps, slowest = threading.Event(), [], [0.0]
    seconds = 3.5 * args.swap_every

    def swapper() -> None:
        for k in range(1, 4):
            if stop.wait(args.swap_every):
                return
            task = tasks[(7 * k) % len(tasks)]
            randomize(model, task, seed=10_000 + k)
            started = time.perf_counter()
            folder = model_files.save_task(model, task, store / "adapters", overwrite=True)
            slowest[0] = max(slowest[0], time.perf_counter() - started)
            exported[task].add(weights_version(folder))
            swaps.append(task)

    thread = threading.Thread(target=swapper, name="hot-swap")
    thread.start()
    try:
        result = run_load(server, jobs, args.clients, 10**9, seconds, exported)
    finally:
        stop.set()
        thread.join(timeout=60)
    return result, len(swaps), slowest[0]


def cold_loads(store_root: Path, count: int) -> dict[str, float]:
    """In-process: index the big store on a fresh `AdapterStore` (max_resident 1) and model, then ``count`` prepares of
    a non-resident task (each evicts the previous one), first reading the file in `prepare` itself, then after
    `AdapterStore.prefetch` (what the server's receiver thread does while the batch before runs). Returns the index
    seconds, both loads' p50 / p95 in ms, the pickle bytes of the index (in all and per task) and the Python heap bytes
    per task that a second index keeps (tracemalloc)."""
    started = time.perf_counter()
    store = AdapterStore(store_root, max_resident=1, say=lambda line: None)
    index_seconds = time.perf_counter() - started
    entries = store.snapshot()
    pickled = len(pickle.dumps(entries))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    again = AdapterStore(store_root, max_resident=1, say=lambda line: None)
    heap = (tracemalloc.get_traced_memory()[0] - before) / len(again.snapshot())
    tracemalloc.stop()
    del again
    store.attach(MTLModel(BACKBONE).eval())
    names = sorted(entries)
    store.prepare([names[-1]])  # warm-up (first-load allocations)
    out = {"index_seconds": index_seconds, "pickled": pickled, "per_task": pickled / len(entries), "heap": heap}
    for label, offset, ahead in (("cold", 0, False), ("prefetched", count, True)):
        times = []
        for name in names[offset:offset + count]:  # other tasks each time: none read before
            if ahead:
                store.prefetch([name])
                time.sleep(0.05)  # the batch before runs meanwhile
            started = time.perf_counter()
            _, failed = store.prepare([name])
            times.append(time.perf_counter() - started)
            assert not failed, failed
        ordered = sorted(times)
        out[f"{label}_p50"] = 1000 * statistics.median(times)
        out[f"{label}_p95"] = 1000 * ordered[min(len(ordered) - 1, round(0.95 * len(ordered)) - 1)]
    store.close()
    return out


def tree_cpu_seconds(server: Server) -> float:
    """CPU seconds (user + system) used so far by the server and every process below it."""
    ticks = 0
    for pid in [server.process.pid, *descendants(server.process.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def idle_cpu(server: Server, seconds: float = 10.0) -> float:
    """Percent of one core the server's processes use while no request comes, over ``seconds``."""
    before = tree_cpu_seconds(server)
    time.sleep(seconds)
    return 100 * (tree_cpu_seconds(server) - before) / seconds


def wait_hashed(server: Server, limit: float = 300.0) -> None:
    """Wait until ``/tasks`` lists a version for every part (the background hasher is done), bounded in time."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{server.base}/tasks", timeout=10) as response:
            if all(t["version"] or t.get("error") for t in json.loads(response.read())["tasks"]):
                return
        time.sleep(1.0)


def main() -> None:
    """Write the stores, run every scenario, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, for checking the script")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--big-store", type=int, default=1000)
    parser.add_argument("--max-resident", type=int, default=64, help="of the big-store server (c)")
    parser.add_argument("--requests", type=int, default=2000, help="per run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="per run")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="--serve.threads of every server but the threads-1 one (default: serve's own default)")
    parser.add_argument("--swap-every", type=float, default=10.0)
    parser.add_argument("--cold-loads", type=int, default=50)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--baseline-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        serve_baseline(args.baseline_server[0], json.loads(args.baseline_server[1]))
        return
    if args.quick:
        args.tasks, args.big_store, args.max_resident, args.requests, args.clients = 8, 24, 8, 60, 8
        args.seconds, args.reps, args.swap_every, args.cold_loads = 10.0, 1, 2.0, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    began, code = time.perf_counter(), code_version()  # what runs is the tree as it is when the servers start
    rng = random.Random(0)
    texts = make_texts(512)
    small_names = [f"t{i:03d}" for i in range(args.tasks)]
    big_names = [f"z{i:04d}" for i in range(args.big_store)]
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        folder = Path(tmp)
        try:
            progress(f"writing a store of {args.tasks} tasks and one of {args.big_store:,} tasks under {folder}")
            started = time.perf_counter()
            writer = MTLModel(BACKBONE)
            exported = write_store(folder / "small", small_names, writer, keep=True)
            big_exported = write_store(folder / "big", big_names, MTLModel(BACKBONE), keep=False)
            write_seconds = time.perf_counter() - started
            big_bytes = sum(f.stat().st_size for f in (folder / "big").rglob("*") if f.is_file())
            progress(f"  written in {write_seconds:.0f} s; big store {big_bytes / 2**20:,.0f} MiB on disk")

            # every server started together, every scenario's runs alternating (one sitting)
            progress("(c) in process first, nothing else running: index and cold loads")
            inproc = cold_loads(folder / "big", args.cold_loads)
            main_server = start_server("main", folder / "small", folder / "main.log", args.threads, args.tasks)
            servers.append(main_server)
            wait_ready(main_server)
            idle_small = worker_rss(main_server)
            servers.append(start_server("threads-1", folder / "small", folder / "threads1.log", 1, args.tasks))
            servers.append(start_server("no-batching", folder / "small", folder / "nobatch.log", args.threads,
                                        args.tasks, max_batch_size=1))
            servers.append(start_server("swap-per-task", folder / "small", folder / "swap.log", args.threads,
                                        args.tasks, baseline="swap"))
            servers.append(start_server("big", folder / "big", folder / "big.log", args.threads, args.max_resident))
            for server in servers:
                wait_ready(server)
            _, threads1_server, nobatch_server, swap_server, big_server = servers
            idle_big = worker_rss(big_server)
            for server in servers:
                wait_hashed(server)
            idle = {"small": idle_cpu(main_server), "big": idle_cpu(big_server)}
            progress(f"  idle CPU: {idle['small']:.2f}% of a core ({args.tasks} tasks), {idle['big']:.2f}% "
                     f"({args.big_store:,} tasks)")
            for server in servers[:-1]:
                warm_up(server, small_names, texts)
            warm_up(big_server, [big_names[0]], texts)  # first-forward costs, not the LRU
            one_task = [(texts[i % len(texts)], small_names[0]) for i in range(args.requests)]
            uniform = [(texts[i % len(texts)], rng.choice(small_names)) for i in range(args.requests)]
            draw = zipf_sampler(args.big_store, args.zipf, rng)
            zipf_jobs = [(texts[i % len(texts)], big_names[draw()]) for i in range(args.requests)]
            cold_jobs = [(texts[i % len(texts)], big_names[i % args.big_store]) for i in range(args.requests)]
            threads_label = f"--serve.threads {args.threads}" if args.threads else "default threads"
            plan = [(Scenario(f"(a) one task ({threads_label})"), main_server, one_task, exported),
                    (Scenario("(a) one task, --serve.threads 1"), threads1_server, one_task, exported),
                    (Scenario(f"(b) {args.tasks} tasks, uniform"), main_server, uniform, exported),
                    (Scenario("(b) no batching (max_batch_size 1)"), nobatch_server, uniform, exported),
                    (Scenario("(b) swap per task (one forward per task)"), swap_server, uniform, exported),
                    (Scenario(f"(c) {args.big_store:,} tasks, Zipf({args.zipf}), max_resident {args.max_resident}"),
                     big_server, zipf_jobs, big_exported),
                    (Scenario(f"(c) every request a task not resident ({args.big_store:,} in turn)"), big_server,
                     cold_jobs, big_exported)]
            for rep in range(args.reps):
                progress(f"repetition {rep + 1}/{args.reps}")
                for scenario, server, jobs, versions in plan:
                    result = run_load(server, jobs, args.clients, args.requests, args.seconds, versions)
                    scenario.runs.append(result)
                    describe_run(scenario.label, result)
            loaded_small, loaded_big = worker_rss(main_server), worker_rss(big_server)
            distinct = len(set(task for _, task in zipf_jobs))
            for server in servers[1:]:
                stop_server(server)
            servers[1:] = []

            # (d): hot swaps during (b)
            progress(f"(d) hot swap every {args.swap_every:.0f} s during (b)")
            long_uniform = [(texts[i % len(texts)], rng.choice(small_names)) for i in range(20_000)]
            swap_result, swaps, slowest_export = hot_swap_run(main_server, long_uniform, writer, folder / "small",
                                                              small_names, exported, args)
            describe_run("(d)", swap_result)
            swapped_seen = sum(len(v) - 1 for v in swap_result.versions.values())
            picked_up = sum(" version " in line and " -> " in line  # the worker's scan line for a replaced export
                            for line in main_server.log.read_text().splitlines())
            evictions = sum("evicted" in line for line in big_server.log.read_text().splitlines())
        finally:
            for server in servers:
                stop_server(server)
    total = time.perf_counter() - began
    d = Scenario(f"(d) (b) + hot swap every {args.swap_every:.0f} s", [swap_result])
    print_tables(args, [scenario for scenario, *_ in plan] + [d], dict(
        code=code, total=total, write_seconds=write_seconds, big_bytes=big_bytes, **inproc, idle=idle,
        idle_small=idle_small, idle_big=idle_big, loaded_small=loaded_small, loaded_big=loaded_big,
        distinct=distinct, evictions=evictions, swaps=swaps, slowest_export=slowest_export, picked_up=picked_up,
        swapped_seen=swapped_seen))


def ratios(top: Scenario, bottom: Scenario) -> str:
    """Median of the per-repetition rate ratios, with their range (runs alternate, so repetition k pairs up)."""
    each = sorted(t.rate / b.rate for t, b in zip(top.runs, bottom.runs))
    return f"{statistics.median(each):.2f} ({each[0]:.2f}-{each[-1]:.2f})"


def code_version() -> str:
    """The git commit measured, and whether ``mtl/`` had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    changed = [line.split()[-1] for line in git("status", "--porcelain", "--", "mtl").splitlines()]
    dirty = f" + uncommitted changes in {', '.join(changed)}" if changed else ""
    return f"commit {git('rev-parse', '--short', 'HEAD')}{dirty}"


def print_tables(args: argparse.Namespace, scenarios: list[Scenario], f: dict[str, Any]) -> None:
    """The markdown tables: scenarios, goals, the big store, the hot swap."""
    a, a1, b, nobatch, swap, zipf, cold, d = scenarios
    threads = f"--serve.threads {args.threads}" if args.threads else "serve's default threads (torch's, one per core)"
    print(f"\ncode: {f['code']}")
    print(f"\nMiniLM-L6, Pfeiffer adapters (3-label heads, random weights); texts of 10-40 words; {args.clients} "
          f"keep-alive clients on 127.0.0.1; each run stops after {args.requests:,} requests or {args.seconds:.0f} s; "
          f"{threads}, serve's defaults otherwise (precision auto, max_batch_size 32, batch_timeout 0.01); "
          f"{os.cpu_count()} cores; medians of {args.reps} alternating runs; total {f['total'] / 60:.1f} min\n")
    print("| scenario | runs | requests | failed | wrong version | req/s | p50 ms | p95 ms | p99 ms | vs (a) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scenario in scenarios:
        print(scenario.row(a.rate))
    runs = [r for scenario in scenarios for r in scenario.runs]
    failed, bad = sum(r.failed for r in runs), sum(r.bad_versions for r in runs)
    per_task_rss = (f["idle_big"] - f["idle_small"]) * 2**20 / (args.big_store - args.tasks)
    goals = [("(b) / (a): a mixed batch costs what a one-task batch costs", ratios(b, a), ">= 0.95",
              statistics.median(t.rate / o.rate for t, o in zip(b.runs, a.runs)) >= 0.95),
             ("(c) Zipf / (a)", ratios(zipf, a), ">= 0.8",
              statistics.median(t.rate / o.rate for t, o in zip(zipf.runs, a.runs)) >= 0.8),
             ("(a) default threads / --serve.threads 1", ratios(a, a1), "-", None),
             ("(b) / no batching", ratios(b, nobatch), "-", None),
             ("(b) / swap per task", ratios(b, swap), "-", None),
             ("cold load of one adapter in process (prepare), p50: file read in prepare / read ahead",
              f"{f['cold_p50']:.1f} / {f['prefetched_p50']:.1f} ms", "<= 10 ms", f["prefetched_p50"] <= 10),
             (f"index of {args.big_store:,} tasks ready", f"{f['index_seconds']:.2f} s", "<= 3 s",
              f["index_seconds"] <= 3),
             ("idle CPU, the whole server: small store / big store",
              f"{f['idle']['small']:.2f}% / {f['idle']['big']:.2f}% of a core", "< 1%",
              max(f["idle"].values()) < 1),
             ("index per stored task: in memory (tracemalloc) / pickled / worker RSS difference",
              f"{f['heap']:,.0f} / {f['per_task']:,.0f} / {per_task_rss:,.0f} bytes", "well under 1 KB",
              f["heap"] < 1024),
             ("failed requests, every run ((d) included)", str(failed), "0", failed == 0),
             ("answers with a version never exported", str(bad), "0", bad == 0)]
    print("\n| check | measured | goal | met |")
    print("|---|---:|---:|---|")
    for name, value, goal, met in goals:
        print(f"| {name} | {value} | {goal} | {'-' if met is None else 'yes' if met else '**no**'} |")
    print(f"\n| store of {args.big_store:,} tasks | value |")
    print("|---|---:|")
    print(f"| written with save_task | {f['write_seconds']:.0f} s for {args.tasks + args.big_store:,} tasks; "
          f"{f['big_bytes'] / 2**20:,.0f} MiB on disk ({f['big_bytes'] / args.big_store / 1024:,.0f} KiB per task) |")
    print(f"| index (AdapterStore scan, in process: configs and file stamps, weights read at first load) | "
          f"{f['index_seconds']:.2f} s |")
    print(f"| cold load of one adapter (prepare of an evicted task, in process), file read in prepare | p50 "
          f"{f['cold_p50']:.1f} ms, p95 {f['cold_p95']:.1f} ms (n = {args.cold_loads}) |")
    print(f"| the same after AdapterStore.prefetch (the receiver thread's read-ahead) | p50 "
          f"{f['prefetched_p50']:.1f} ms, p95 {f['prefetched_p95']:.1f} ms (n = {args.cold_loads}) |")
    print(f"| index size per task: Python heap a second index keeps (tracemalloc) | {f['heap']:,.0f} bytes |")
    print(f"| index size per task: pickle of the index entries (what the worker is sent) | {f['per_task']:,.0f} bytes "
          f"({f['pickled'] / 2**20:.2f} MiB for {args.big_store:,}) |")
    print(f"| worker RSS idle: {args.tasks} tasks / {args.big_store:,} tasks indexed | {f['idle_small']:,.0f} / "
          f"{f['idle_big']:,.0f} MiB (difference per extra task: {per_task_rss:,.0f} bytes) |")
    print(f"| worker RSS after the runs: (b) server / (c) server | {f['loaded_small']:,.0f} / "
          f"{f['loaded_big']:,.0f} MiB |")
    print(f"| (c) distinct tasks in the Zipf request list / eviction lines logged (at most one per 10 s) | "
          f"{f['distinct']} / {f['evictions']} |")
    print("\n| hot swap (d) | value |")
    print("|---|---:|")
    print(f"| swaps (re-exports, overwrite=True) | {f['swaps']} (slowest export {f['slowest_export'] * 1000:.0f} ms) |")
    print(f"| replacements the server logged ('<task>' version old -> new) | {f['picked_up']} |")
    print(f"| new versions seen in answers | {f['swapped_seen']} |")
    print(f"| failed requests / answers with a version never exported | {d.runs[0].failed} / "
          f"{d.runs[0].bad_versions} |")

if __name__ == "__main__":
    main()
