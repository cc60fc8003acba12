"""``train.py serve`` as a user runs it: a real server process on a free 127.0.0.1 port, real HTTP. Concurrent
mixed-task requests equal `MTLModel.forward` on each text alone, eviction below the part count, the router path,
every bad request's status and one-line message, a hot swap under a bounded stream of requests (every answer from
one version, none failed), a broken export ignored with the old version kept, and the API keys. Every loop is
bounded in count and time; the server is stopped even when a test fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mtl.backbone import load_tokenizer
from mtl.routing import load_router
from mtl.serving.api import FULL_SCAN_EVERY
from tests.serving_helpers import FUSION, LABELS, TASKS, TEXTS, expected, retrain, store_model, write_store

ROOT = Path(__file__).resolve().parent.parent
KEY, ADMIN = "test-key", "admin-key"
POLL = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: object = None, raw: bytes | None = None, key: str | None = KEY,
         headers: dict | None = None) -> tuple[int, object]:
    """(status, parsed JSON or text) of one request to the local server."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={**({"X-API-Key": key} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """The server on a store of 4 tasks + 1 fusion with max_resident 3; yields (base URL, store, log file)."""
    root = tmp_path_factory.mktemp("serving")
    store = write_store(root / "store", tiny_dir)
    port, log = _free_port(), root / "server.log"
    command = [sys.executable, str(ROOT / "train.py"), "serve", "--serve.store", str(store), "--serve.port", str(port),
               "--serve.backbone", str(tiny_dir), "--serve.max_resident", "3", "--serve.poll_seconds", str(POLL),
               "--serve.batch_timeout", "0.02", "--serve.threads", "1", "--serve.api_key", KEY, "--serve.precision", "32-true",
               "--serve.admin_key", ADMIN]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if call(f"{base}/health")[0] == 200 and call(f"{base}/tasks")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
        yield base, store, log
    finally:
        try:
            call(f"{base}/shutdown", raw=b"", key=None, headers={"Authorization": f"Bearer {ADMIN}"})
            process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def reference(server, tiny_dir):
    _, store, _ = server
    return store_model(store, tiny_dir), load_tokenizer(str(tiny_dir))


def _scores(answer: dict) -> torch.Tensor:
    return torch.tensor([answer["scores"][label] for label in LABELS])


def _length(task: str) -> int:
    return 8 if task == "t2" else 32


def test_concurrent_mixed_requests_equal_each_text_alone_and_eviction_keeps_three(server, reference):
    base, _, _ = server
    model, tokenizer = reference
    jobs = [(TEXTS[i % len(TEXTS)], [*TASKS, FUSION][i % 5]) for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: call(f"{base}/predict", {"text": job[0], "task": job[1]}), jobs))
    for (text, task), (status, answer) in zip(jobs, answers):
        assert status == 200 and answer["task"] == task
        assert torch.allclose(_scores(answer), expected(model, tokenizer, text, task, _length(task)), atol=1e-5)
    status, listing = call(f"{base}/tasks")
    assert status == 200 and sorted(row["task"] for row in listing["tasks"]) == sorted([*TASKS, FUSION])
    for task in ("t2", "t3"):  # one batch may need all five parts; single requests bring it back to three
        assert call(f"{base}/predict", {"text": "one more", "task": task})[0] == 200
    time.sleep(0.5)  # the listing is republished within a quarter second of a change
    resident = {row["task"] for row in call(f"{base}/tasks")[1]["tasks"] if row["resident"]}
    assert {"t2", "t3"} <= resident and len(resident) <= 3


def test_texts_without_a_task_go_where_the_store_router_sends_them(server, reference, tiny_dir):
    base, store, _ = server
    model, tokenizer = reference
    status, answer = call(f"{base}/predict", {"texts": TEXTS[:3]})
    batch = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    chosen = load_router(store / "router").route(model, batch["input_ids"], batch["attention_mask"])
    assert status == 200 and [a["task"] for a in answer] == chosen
    for a, text in zip(answer, TEXTS):
        assert a["routed"] is True
        assert torch.allclose(_scores(a), expected(model, tokenizer, text, a["task"], _length(a["task"])), atol=1e-5)


@pytest.mark.parametrize("raw, status, message", [
    (b'{"text": "unterminated', 400, "body is not valid JSON"),
    (b"[1, 2]", 400, "body is a JSON list, expected an object with 'text' or 'texts'"),
    (b'{"task": "t0"}', 400, "give exactly one of 'text' (a string) or 'texts' (a list of strings)"),
    (b'{"text": ""}', 400, "text: got '', expected a non-empty string"),
    (b'{"text": ["a"], "task": "t0"}', 400, "text: got \"['a']\", expected a string, a question about a context"),
    (b'{"text": "a", "task": 7}', 400, "task: got '7', expected a task name (a string)"),
    (b'{"text": "a", "task": "nope"}', 404, "task: unknown task 'nope'; GET /tasks lists the 5 servable"),
    (json.dumps({"texts": ["a"] * 10_000}).encode(), 400, "texts: 10000 texts, expected at most 256 per request"),
    (json.dumps({"text": "a" * 1_100_000}).encode(), 413, "text: 1,100,000 bytes, expected at most 1,048,576"),
    (json.dumps({"text": "a" * 9_000_000}).encode(), 413, "request body over 8 MB"),
    (b'{"text": "half a pair \\ud800", "task": "t0"}', 400, "text: holds a lone surrogate U+D800 at character 13"),
])
def test_a_bad_request_gets_its_status_and_one_line_and_the_worker_lives_on(server, raw, status, message):
    base, _, _ = server
    got, body = call(f"{base}/predict", raw=raw)
    assert got == status and message in body["error"] and "\n" not in body["error"]
    assert call(f"{base}/predict", {"text": "still here", "task": "t0"})[0] == 200


def test_keys_are_required_where_configured(server):
    base, _, _ = server
    assert call(f"{base}/predict", {"text": "a", "task": "t0"}, key=None)[0] in (401, 403)
    assert call(f"{base}/predict", {"text": "a", "task": "t0"}, key="wrong")[0] == 401
    assert call(f"{base}/tasks", key=None)[0] in (401, 403)
    assert call(f"{base}/shutdown", raw=b"", key=None, headers={"Authorization": "Bearer wrong"})[0] == 401


def test_a_hot_swap_under_load_answers_every_request_from_one_version(server, reference, tiny_dir):
    base, store, log = server
    model, tokenizer = reference
    old = expected(model, tokenizer, TEXTS[0], "t2", 8)
    swapped_at, seen = None, []
    deadline = time.monotonic() + 60
    for i in range(400):  # bounded in count and in time
        if time.monotonic() > deadline or sum(a["version"] != seen[0][1]["version"] for _, a in seen) >= 10:
            break  # ten answers from the new version after the swap
        status, answer = call(f"{base}/predict", {"text": TEXTS[0], "task": "t2"})
        seen.append((status, answer))
        if i == 5:
            retrain(store, tiny_dir, "t2", seed=123)
            swapped_at = i
    new = expected(store_model(store, tiny_dir), tokenizer, TEXTS[0], "t2", 8)
    assert swapped_at is not None and all(status == 200 for status, _ in seen)
    versions = list(dict.fromkeys(a["version"] for _, a in seen))
    assert len(versions) == 2, versions  # the old version, then the new one: never a third, never back
    flips = sum(1 for (_, a), (_, b) in zip(seen, seen[1:]) if a["version"] != b["version"])
    assert flips == 1
    for _, answer in seen:
        want = old if answer["version"] == versions[0] else new
        assert torch.allclose(_scores(answer), want, atol=1e-5)
    assert not torch.allclose(old, new, atol=1e-3)
    assert f"'t2' version {versions[0]} -> {versions[1]}" in log.read_text()


def test_a_broken_export_is_ignored_and_the_old_version_answers(server, reference):
    base, store, log = server
    model, tokenizer = reference
    status, before = call(f"{base}/predict", {"text": TEXTS[1], "task": "t1"})
    weights = store / "adapters" / "t1" / "adapter.safetensors"
    good = weights.read_bytes()
    try:
        weights.write_bytes(good[: len(good) // 2])  # a half-copied file, written in place
        time.sleep(POLL * (FULL_SCAN_EVERY + 2))  # no folder changed: the next full scan finds it
        again = call(f"{base}/predict", {"text": TEXTS[1], "task": "t1"})
        assert status == 200 and again == (200, before)
        assert torch.allclose(_scores(before), expected(model, tokenizer, TEXTS[1], "t1", 32), atol=1e-5)
        lines = [line for line in log.read_text().splitlines() if "kept version" in line]
        assert len(lines) == 1 and "t1" in lines[0] and "not a readable safetensors file" in lines[0]
    finally:
        weights.write_bytes(good)
