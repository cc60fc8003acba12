"""``train.py serve`` as an operator runs it: real processes on a free 127.0.0.1 port, stopped the way people stop
them. SIGTERM and Ctrl-C answer the requests in flight, leave no process and free the port; a killed inference worker
gives its requests a prompt 503 and is restarted; a ``kill -9`` of the main process takes its children with it; a
busy port is one line; the server and ``train.py predict`` give the same label and score at the same precision.
Every loop is bounded in count and time; every process a test starts is killed in a finaliser."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from mtl.cli import main
from tests.serving_helpers import TASKS, TEXTS, write_store
from tests.test_fit_output import NOISE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the serving benchmark's process-tree walk, not a second copy
from serving import descendants  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(base: str, body: dict, timeout: float = 30) -> tuple[int, dict | str, dict]:
    """(status, JSON body, headers) of one POST /predict."""
    request = urllib.request.Request(f"{base}/predict", data=json.dumps(body).encode(),
                                     headers={"X-Request-ID": "client-7"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture()
def start(tiny_dir, tmp_path):
    """A function starting ``train.py serve`` on the tiny store (own session); every process is killed at the end."""
    store = write_store(tmp_path / "store", tiny_dir)
    started: list[tuple[subprocess.Popen, list[int]]] = []

    def run(*extra: str, wait: bool = True) -> tuple[subprocess.Popen, str, Path]:
        port, log = free_port(), tmp_path / f"serve{len(started)}.log"
        command = [sys.executable, str(ROOT / "train.py"), "serve", "--serve.store", str(store), "--serve.port",
                   str(port), "--serve.backbone", str(tiny_dir), "--serve.threads", "1", *extra]
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                       env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        started.append((process, []))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while wait and time.monotonic() < deadline and process.poll() is None:
            if get(f"{base}/ready")[0] == 200:
                break
            time.sleep(0.2)
        if wait and get(f"{base}/ready")[0] != 200:
            pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
        started[-1][1].extend(descendants(process.pid))
        return process, base, log

    yield run
    for process, children in started:
        for pid in [*children, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.kill()
        process.wait(timeout=10)


def load(base: str, seconds: float, clients: int = 4) -> tuple[list, threading.Event, list[threading.Thread]]:
    """``clients`` threads posting 64-text requests for at most ``seconds``; (results, stop event, threads)."""
    results, stop = [], threading.Event()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                status, _, _ = post(base, {"texts": [TEXTS[2]] * 64, "task": TASKS[i % 4]})
            except OSError as err:
                status = type(err).__name__
            results.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    return results, stop, threads


def test_sigterm_answers_in_flight_requests_leaves_no_process_and_frees_the_port(start):
    process, base, log = start()
    children = descendants(process.pid)
    assert len(children) >= 2  # LitServe's queue manager and the inference worker (and a resource tracker)
    results, stop, threads = load(base, seconds=20)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert process.wait(timeout=40) == 0
    stop.set()
    for t in threads:
        t.join(timeout=40)
    in_flight = [status for sent, done, status in results if sent < signalled < done]
    assert in_flight and all(status == 200 for status in in_flight), Counter(map(str, in_flight))
    assert all(status in (200, 503) or isinstance(status, str) for _, _, status in results)
    time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)]
    port = int(base.rsplit(":", 1)[1])
    assert port_is_free(port)
    lines = log.read_text().splitlines()
    assert any("stopping (SIGTERM)" in line for line in lines) and "stopped (exit code 0)" in lines[-1]
    assert "Traceback" not in log.read_text()
    assert [n for n in NOISE if n in log.read_text()] == []  # the console filter holds in serve's processes too


def test_ctrl_c_to_the_process_group_stops_everything_with_exit_0(start):
    process, base, log = start()
    children = descendants(process.pid)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal sends to the foreground group
    assert process.wait(timeout=40) == 0
    time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)]
    assert "stopping (SIGINT)" in log.read_text() and "Traceback" not in log.read_text()


def test_a_killed_worker_gives_in_flight_requests_a_prompt_503_and_is_restarted(start):
    process, base, log = start()
    worker = next(pid for pid in descendants(process.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())
    results, stop, threads = load(base, seconds=6)
    time.sleep(1.0)
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=40)
    in_flight = [(done - killed, status) for sent, done, status in results if sent < killed < done]
    # an answer the worker had sent before it died may still arrive (200, within milliseconds); none may hang
    assert any(status == 503 for _, status in in_flight), in_flight
    assert all(wait < 3.0 and (status == 503 or (status == 200 and wait < 0.1)) for wait, status in in_flight), in_flight
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and get(f"{base}/ready")[0] != 200:
        time.sleep(0.2)
    status, answer, headers = post(base, {"text": TEXTS[0], "task": "t1"})
    assert status == 200 and answer["task"] == "t1" and headers["x-request-id"] == "client-7"
    text = log.read_text()
    assert "died (killed by SIGKILL)" in text and "restarting it" in text and "ready again" in text
    assert "mtl_worker_restarts_total 1.0" in get(f"{base}/metrics")[1]
    assert process.poll() is None


def test_kill_9_of_the_main_process_takes_its_children(start):
    process, base, _ = start()
    children = descendants(process.pid)
    process.kill()
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)]
    assert port_is_free(int(base.rsplit(":", 1)[1]))


def test_a_busy_port_is_one_line_and_exit_2(start, tiny_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), "serve", "--serve.store", str(tmp_path),
                               "--serve.port", str(port)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: serve.port: 127.0.0.1:{port} cannot be bound (Address already in use), "
                                   "expected a free port")


def test_metrics_ready_health_and_error_bodies(start):
    process, base, log = start("--serve.api_key", "k", "--serve.admin_key", "admin-secret-4")
    assert get(f"{base}/health") == (200, '{"status":"ok"}')  # probes have no secret
    assert get(f"{base}/ready")[0] == 200
    status, body = get(f"{base}/nowhere")
    assert status == 404 and json.loads(body) == {"error": "Not Found"}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{base}/predict", headers={"X-API-Key": "k"}), timeout=10)
    assert err.value.code == 405 and json.loads(err.value.read()) == {"error": "Method Not Allowed"}
    assert get(f"{base}/predict")[0] == 401  # the key first
    assert get(f"{base}/metrics")[0] == 401 and "error" in json.loads(get(f"{base}/metrics")[1])
    for _ in range(3):
        request = urllib.request.Request(f"{base}/predict", data=json.dumps({"text": "a b", "task": "t2"}).encode(),
                                         headers={"X-API-Key": "k"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200 and len(response.headers["X-Request-ID"]) == 16
    status, answer, _ = post(base, {"text": "a b", "task": "t2"})  # no key
    assert status == 401 and answer == {"error": "missing or wrong X-API-Key header"}
    request = urllib.request.Request(f"{base}/metrics", headers={"X-API-Key": "k"})
    with urllib.request.urlopen(request, timeout=10) as response:
        metrics = response.read().decode()
    assert 'mtl_requests_total{path="/predict",status="200",task="t2"} 3.0' in metrics
    assert 'mtl_requests_total{path="/predict",status="401",task="none"} 2.0' in metrics  # the GET and the POST
    assert "mtl_batch_requests_count 3.0" in metrics and "mtl_resident_parts 1.0" in metrics
    assert "mtl_cold_loads_total 1.0" in metrics
    schema = json.loads(get(f"{base}/openapi.json")[1])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/PredictRequest"}
    assert set(schema["components"]["schemas"]["PredictAnswer"]["properties"]) >= {"task", "label", "score", "version"}
    text = log.read_text()
    assert "admin-secret-4" not in text and ":8000" not in text and base in text  # the real address, never a key


def test_a_body_nested_too_deep_is_one_400(start):
    process, base, log = start()
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"text": ' + b"[" * 50 + b"]" * 50 + b"}"):
        request = urllib.request.Request(f"{base}/predict", data=raw)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 400 and "nests arrays or objects more than 8 levels" in json.loads(err.value.read())["error"]
    assert "Traceback" not in log.read_text() and "RecursionError" not in log.read_text()


def test_without_a_router_a_request_without_task_is_a_400_saying_how_to_get_one(start, tmp_path):
    process, base, _ = start("--serve.router", "none")
    status, answer, _ = post(base, {"text": "no task here"})
    assert status == 400 and "without a router" in answer["error"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_serve_and_predict_give_the_same_label_and_score_at_the_same_precision(start, tiny_dir, tmp_path, precision,
                                                                               capsys):
    # shorter than every task's max_length (t2: 8 tokens): predict_file truncates at data.predict_max_length, the
    # server at each task's own max_length, so longer texts may differ by design
    texts = [f"{t} {i}" for i, t in enumerate(TEXTS) if len(t.split()) <= 4] * 2
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / f"pred-{precision}.jsonl"
    store = tmp_path / "store"
    process, base, _ = start("--serve.precision", precision)
    try:
        main(["predict", "--model.backbone", str(tiny_dir), "--model.load_from", str(store), "--model.run_dir",
              str(tmp_path / "run"), "--data.tasks", "[]", "--data.predict_file", str(tmp_path / "texts.txt"),
              "--data.cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.precision", precision,
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.callbacks+=mtl.predict.PredictionWriter",
              f"--trainer.callbacks.output={out}"])
    except SystemExit as done:
        assert done.code in (0, None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["task"] for r in rows} >= set(TASKS)
    for row in rows:
        status, answer, _ = post(base, {"text": texts[row["index"]], "task": row["task"]})
        assert status == 200 and answer["label"] == row["label"], (row, answer)
        assert abs(answer["score"] - row["score"]) <= 1e-6, (row, answer)
