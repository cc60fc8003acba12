"""`MTLServer`: LitServe's app, request queue and inference worker, in processes that mtl supervises.

Processes: the main one (HTTP in a thread, this supervisor in the main thread), LitServe's queue manager and ONE
inference worker. What an operator can count on:
- SIGTERM, SIGINT (Ctrl-C) and ``POST /shutdown`` stop the same way: new predictions get 503, requests in flight are
  answered (for at most ``serve.timeout`` seconds), the worker and the manager are stopped, the port is freed, exit 0.
- The children die with the main process, even a ``kill -9`` of it (``PR_SET_PDEATHSIG``).
- A worker that dies is restarted: the requests it held get a 503 at once, new ones get a 503 until it is back; after
  ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW`` seconds the server stops with one line and exit 1, for a
  supervisor (systemd, Docker, Kubernetes) to restart it.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from multiprocessing.managers import SyncManager
from typing import TYPE_CHECKING, Any

import litserve as ls
import uvicorn
from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE
from litserve.transport.factory import create_transport_from_config
from litserve.utils import LitAPIStatus

from mtl.serving.http import RequestGuard, ServerState, install_routes
from mtl.serving.metrics import ServingMetrics
from mtl.serving.say import say

if TYPE_CHECKING:
    from mtl.serving.api import AdapterServingAPI
    from mtl.serving.cli import ServeConfig

MAX_RESTARTS, RESTART_WINDOW = 3, 300.0
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the process that started it dies (Linux); exit if it is gone already."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor still stops its children on every clean exit
        return
    if os.getppid() != parent:
        os._exit(1)


def _manager_start(parent: int, listening: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process decides
    try:
        os.close(listening)  # a forked copy of the port must not outlive the server
    except OSError:
        pass


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts (a busy port is an `OSError` here, not later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def describe_exit(code: int | None) -> str:
    """'killed by SIGKILL' / 'exit code 1' for a process' exit code."""
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class MTLServer(ls.LitServer):
    """A LitServer run by mtl's supervisor (see the module docstring)."""

    def __init__(self, api: AdapterServingAPI, config: ServeConfig, accelerator: str) -> None:
        """LitServe's app and worker settings for ``api``; mtl's guard, routes and metrics on its app."""
        self.state = ServerState()
        self.metrics = ServingMetrics(lambda: len(self.response_buffer))
        self.config = config
        super().__init__(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=config.timeout,
                         middlewares=[(RequestGuard, {"state": self.state, "metrics": self.metrics,
                                                       "api_key": config.api_key})],
                         enable_shutdown_api=False)
        install_routes(self.app, self.state, self.metrics, config.admin_key)
        self._signals: deque[int] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- processes -------------------------------------------------------------------------------
    def _init_manager(self, num_api_servers: int) -> SyncManager:
        """LitServe's queues, in a manager process that dies with this one and does not hold the port."""
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(_manager_start, (os.getpid(), self._listening.fileno()))
        self.transport_config.manager = manager
        self.transport_config.num_consumers = num_api_servers
        self.workers_setup_status = manager.dict()
        self._shutdown_event = manager.Event()
        for lit_api in self.litapi_connector:
            self.litapi_request_queues[lit_api.api_path] = manager.Queue()
        self._transport = create_transport_from_config(self.transport_config)
        return manager

    def _start_worker(self) -> tuple[Any, Any]:
        """A fresh inference worker and the pipe it reports on."""
        reports, sender = mp.get_context("spawn").Pipe(duplex=False)
        self.lit_api.reports = sender
        self.lit_api.parent_pid = os.getpid()
        worker = self.launch_single_inference_worker(self.lit_api, 0)
        sender.close()  # the worker holds its end: the pipe reads EOF when the worker dies
        self.lit_api.reports = None
        self.inference_workers = [worker]
        return worker, reports

    def _http(self, sock: socket.socket) -> uvicorn.Server:
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=int(self.config.timeout) + 1)
        server = uvicorn.Server(config)

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        def run() -> None:
            try:
                asyncio.run(serve())
            finally:
                self._signals.append(0)  # wake the supervisor: HTTP has ended
                try:
                    self._wake.send(b"\0")
                except OSError:
                    pass

        self._http_thread = threading.Thread(target=run, name="mtl-http", daemon=True)
        self._http_thread.start()
        return server

    # ---- in-flight requests ----------------------------------------------------------------------
    def _in_flight(self) -> list[Any]:
        """The requests sent to the worker and not answered yet (their response-buffer items)."""
        return [item for item in list(self.response_buffer.values()) if not item.event.is_set()]

    def _fail_in_flight(self, status: int, message: str) -> int:
        """Answer every request waiting for the worker with ``status`` now; returns how many."""
        if self._loop is None:
            return 0
        pending = self._in_flight()

        def fail() -> None:
            for item in pending:
                if not item.event.is_set():
                    item.response = (HTTPException(status, message), LitAPIStatus.ERROR)
                    item.event.set()

        self._loop.call_soon_threadsafe(fail)
        return len(pending)

    def _drain_requests(self) -> None:
        """Drop requests a dead worker left in the queue (their clients have had a 503)."""
        request_queue = self._get_request_queue(self.lit_api.api_path)
        try:
            while True:
                request_queue.get_nowait()
        except (queue.Empty, OSError, EOFError):
            pass

    # ---- the supervisor --------------------------------------------------------------------------
    def serve(self, sock: socket.socket, address: str) -> int:
        """Serve on ``sock`` until a stop signal (exit code 0) or a fatal failure (1)."""
        self._listening = sock
        self.app.response_queue_id = 0
        manager = self._init_manager(1)
        wake_read, self._wake = socket.socketpair()
        self._wake.setblocking(False)
        signal.set_wakeup_fd(self._wake.fileno())  # a signal wakes the wait below at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda number, frame: self._signals.append(number))
        self._worker, self._reports = self._start_worker()
        http = self._http(sock)
        why, code = self._supervise(manager, wake_read, address)
        self._stop(http, manager, why, code)
        return code

    def _supervise(self, manager: SyncManager, wake: socket.socket, address: str) -> tuple[str, int]:
        """Wait for the worker's reports, its death, the manager's death or a signal; (why it stopped, exit code)."""
        deaths: deque[float] = deque()
        started, ever_ready, reports_open = time.monotonic(), False, True
        while True:
            worker = self._worker
            ready = mp.connection.wait([worker.sentinel, manager._process.sentinel, wake,
                                        *([self._reports] if reports_open else [])])
            if wake in ready:
                wake.recv(4096)
            while self._signals:
                number = self._signals.popleft()
                if number == 0:
                    return "the HTTP server ended", 1
                return signal.Signals(number).name, 0
            if manager._process.sentinel in ready:
                return "LitServe's queue manager died", 1
            if self._reports in ready and reports_open:
                try:
                    report = self._reports.recv()
                except (EOFError, OSError):  # the worker is ending: its sentinel says when
                    reports_open = False
                    continue
                if report.get("ready"):
                    say(f"{'inference worker restarted; ready again' if ever_ready else 'ready'} at {address} "
                        f"({time.monotonic() - started:.1f} s; POST /predict, GET /tasks /health /ready /metrics)")
                    ever_ready = True
                self._report(report)
            if worker.sentinel not in ready:
                continue
            worker.join()
            self.state.ready = False
            if not ever_ready:
                return f"the inference worker failed to start ({describe_exit(worker.exitcode)})", 1
            failed = self._fail_in_flight(503, "the inference worker died; retry")
            now = time.monotonic()
            deaths.append(now)
            while now - deaths[0] > RESTART_WINDOW:
                deaths.popleft()
            if len(deaths) > MAX_RESTARTS:
                return (f"the inference worker died {len(deaths)} times in {RESTART_WINDOW:.0f} s "
                        f"(last: {describe_exit(worker.exitcode)})"), 1
            self.state.why_not_ready = "the inference worker is restarting"
            say(f"inference worker (pid {worker.pid}) died ({describe_exit(worker.exitcode)}); {failed} request(s) "
                "in flight answered 503; restarting it")
            self.metrics.worker.worker_gone()
            self._drain_requests()
            self._reports.close()
            self._worker, self._reports = self._start_worker()
            started, reports_open = time.monotonic(), True

    def _report(self, report: dict[str, Any]) -> None:
        """One message from the worker: it is ready, the listing changed, or a batch ran."""
        if "tasks" in report:
            self.state.tasks = report["tasks"]
            self.state.names = frozenset(t["task"] for t in self.state.tasks)
        if "resident_names" in report:
            self.state.resident = frozenset(report["resident_names"])
        if "requests" in report:
            self.metrics.observe_batch(report)
        if report.get("ready"):
            self.state.ready = True

    def _stop(self, http: uvicorn.Server, manager: SyncManager, why: str, code: int) -> None:
        """Refuse new predictions, answer those in flight, then stop the worker, the manager and HTTP."""
        worker = self._worker
        self.state.stopping = True
        say(f"stopping ({why}); {len(self._in_flight())} request(s) in flight")
        deadline = time.monotonic() + self.config.timeout
        while worker.is_alive() and time.monotonic() < deadline and self._in_flight():
            if self._signals:
                break  # a second SIGTERM or Ctrl-C: stop now
            time.sleep(0.02)
        self._fail_in_flight(503, "the server is stopping")
        http.should_exit = True
        try:
            self._get_request_queue(self.lit_api.api_path).put(_SENTINEL_VALUE)
        except (OSError, EOFError):
            pass
        worker.join(3)
        if worker.is_alive():
            worker.terminate()
            worker.join(3)
        if worker.is_alive():
            worker.kill()
            worker.join()
        self._transport.close(send_sentinel=False)
        try:
            manager.shutdown()
        except (OSError, EOFError):  # it is gone already (what stopped the server)
            pass
        self._http_thread.join(5)
        self._listening.close()
        say(f"stopped (exit code {code})")
