"""The HTTP side of serving (the server's main process): the request guard, mtl's routes and its error bodies.

`RequestGuard` sees every request first: it gives each one an id (``X-Request-ID``, echoed when the client sent one),
checks ``serve.api_key`` on ``/predict``, ``/tasks`` and ``/metrics``, answers ``POST /predict`` at once with a 503 while no worker can take it, refuses bodies that are too large, not
JSON, nested too deep or not objects (so the inference worker never sees them), and counts every answer in the
metrics. `install_routes` replaces LitServe's ``/``, ``/health``, ``/info`` and ``/shutdown`` with mtl's
``/health``, ``/ready``, ``/tasks``, ``/metrics`` and (with an admin key) ``/shutdown``, and makes every 4xx/5xx answer
``{"error": "<one line>"}``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mtl.serving.metrics import CONTENT_TYPE, ServingMetrics

MAX_BODY_BYTES = 8 << 20  # a whole request body; more is a 413 before it is read further
MAX_DEPTH = 8  # nesting of a request body's arrays and objects (a valid one has 2)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # an id a client may choose (it goes into log lines)
PATHS = ("/predict", "/tasks", "/health", "/ready", "/metrics", "/shutdown", "/docs", "/openapi.json")
KEYED = ("/predict", "/tasks", "/metrics")  # what serve.api_key guards; probes and the admin route have their own rules


def error(status: int, message: str) -> JSONResponse:
    """A 4xx/5xx answer with a one-line ``{"error": ...}`` body."""
    return JSONResponse({"error": " ".join(str(message).splitlines())}, status_code=status)


@dataclass
class ServerState:
    """What the HTTP side knows of the worker (the main process updates it from the worker's reports)."""

    tasks: list[dict[str, Any]] = field(default_factory=list)  # the index as the worker last listed it
    names: frozenset[str] = frozenset()  # the names in ``tasks``, for a per-request lookup
    resident: frozenset[str] = frozenset()  # what the worker's last batch left resident
    ready: bool = False
    stopping: bool = False
    why_not_ready: str = "the inference worker is starting"

    def task_label(self, task: Any) -> str:
        """A request's task as a metric label: known names only, so clients cannot grow the label set."""
        if task is None:
            return "none"
        return task if task in self.names else "unknown"


def nested_too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests arrays or objects more than ``limit`` levels (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


class RequestGuard:
    """ASGI middleware in front of every route: request id, early refusals, metrics."""

    def __init__(self, app: Any, state: ServerState, metrics: ServingMetrics, api_key: str | None = None,
                 path: str = "/predict") -> None:
        self.app, self.state, self.metrics, self.api_key, self.path = app, state, metrics, api_key, path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        sent_id = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = sent_id if REQUEST_ID.fullmatch(sent_id) else secrets.token_hex(8)
        answer = {"status": 500, "task": "none"}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if self.api_key and scope["path"] in KEYED and not secrets.compare_digest(
                    dict(scope["headers"]).get(b"x-api-key", b""), self.api_key.encode()):
                await error(401, "missing or wrong X-API-Key header")(scope, receive, send_with_id)
            elif scope["method"] == "POST" and scope["path"] == self.path:
                await self._predict(scope, receive, send_with_id, rid, answer)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.observe_request(path, answer["status"], answer["task"], time.monotonic() - started)

    async def _predict(self, scope: dict, receive: Any, send: Any, rid: str, answer: dict) -> None:
        if self.state.stopping or not self.state.ready:
            reason = "the server is stopping" if self.state.stopping else self.state.why_not_ready
            await error(503, f"{reason}; retry later (request {rid})")(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await error(413, f"request body over {MAX_BODY_BYTES >> 20} MB")(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        deep = False
        try:
            data = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            await error(400, f"body is not valid JSON ({err}), expected an object like "
                             '{"text": "...", "task": "..."}')(scope, receive, send)
            return
        except RecursionError:  # deeper than the parser's own limit
            data, deep = None, True
        if deep or nested_too_deep(data):
            await error(400, f"body nests arrays or objects more than {MAX_DEPTH} levels deep, expected an object "
                             'like {"text": "...", "task": "..."}')(scope, receive, send)
            return
        if not isinstance(data, dict):
            await error(400, f"body is a JSON {type(data).__name__}, expected an object with 'text' or 'texts'")(
                scope, receive, send)
            return
        answer["task"] = self.state.task_label(data.get("task"))
        # the worker names the request in its log lines; a client's own "request_id" key is overwritten
        body = json.dumps({**data, "request_id": rid}).encode()
        # the body is JSON whatever the client said (curl -d says form data, which LitServe would parse as a form)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class PredictRequest(BaseModel):
    """The body of ``POST /predict``: one of ``text`` / ``texts``, and the task (or none, with a router)."""

    text: str | None = Field(None, description="One text (give this or 'texts')")
    texts: list[str] | None = Field(None, description="Up to 256 texts, answered as a list in the same order")
    task: str | None = Field(None, description="Task or fusion name (GET /tasks); without it the store's router "
                                               "picks one per text")


class PredictAnswer(BaseModel):
    """One text's answer (a list of these for ``texts``)."""

    task: str = Field(description="The task that answered")
    label: str | list[str] | None = Field(description="The predicted label (labels for multilabel, null for regression)")
    score: float | list[float] = Field(description="Probability of the label, or the regressed value")
    scores: dict[str, float] | None = Field(description="Probability of every label")
    version: str = Field(description="First 12 hex digits of the answering adapter file's SHA-256")
    routed: bool | None = Field(None, description="True when the router chose the task")


class ErrorAnswer(BaseModel):
    """Every 4xx/5xx answer."""

    error: str = Field(description="What was wrong, in one line")


def _document_predict(app: FastAPI) -> None:
    """Describe ``/predict``'s body and answers in the OpenAPI schema (LitServe's route reads the raw request)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            parts = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (PredictRequest, PredictAnswer, ErrorAnswer):
                parts[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            ref = {name: {"$ref": f"#/components/schemas/{name}"} for name in parts}
            failure = {"description": "Refused (one line)", "content": {"application/json": {"schema": ref["ErrorAnswer"]}}}
            schema["paths"]["/predict"]["post"].update(
                requestBody={"required": True, "content": {"application/json": {"schema": ref["PredictRequest"]}}},
                responses={"200": {"description": "The answer, or a list of answers for 'texts'", "content": {
                    "application/json": {"schema": {"anyOf": [ref["PredictAnswer"],
                                                              {"type": "array", "items": ref["PredictAnswer"]}]}}}},
                    **{code: failure for code in ("400", "401", "404", "413", "503", "504")}})
        return app.openapi_schema if app.openapi_schema is not None else schema

    app.openapi = openapi


def install_routes(app: FastAPI, state: ServerState, metrics: ServingMetrics, admin_key: str | None) -> None:
    """mtl's routes and error bodies on LitServe's app (see the module docstring)."""
    app.router.routes = [r for r in app.router.routes
                         if getattr(r, "path", None) not in ("/", "/health", "/info", "/shutdown")]
    async def health() -> JSONResponse:
        return JSONResponse({"status": "stopping" if state.stopping else "ok"})

    async def ready() -> JSONResponse:
        if state.stopping or not state.ready:
            return error(503, "the server is stopping" if state.stopping else state.why_not_ready)
        return JSONResponse({"ready": True, "tasks": len(state.tasks)})

    async def tasks() -> JSONResponse:
        if not state.tasks:
            return error(503, state.why_not_ready)
        return JSONResponse({"tasks": [{**t, "resident": t["task"] in state.resident} for t in state.tasks]})

    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_api_route("/health", health, methods=["GET"], summary="Liveness: the HTTP process answers (open)")
    app.add_api_route("/ready", ready, methods=["GET"], summary="Readiness: the worker is up and the store indexed")
    app.add_api_route("/tasks", tasks, methods=["GET"], summary="Every servable task and fusion")
    app.add_api_route("/metrics", prometheus, methods=["GET"], summary="Prometheus metrics")
    if admin_key:
        async def shutdown() -> JSONResponse:
            os.kill(os.getpid(), signal.SIGTERM)  # the same clean stop as a SIGTERM from outside
            return JSONResponse({"stopping": True})

        app.add_api_route("/shutdown", shutdown, methods=["POST"], dependencies=[Depends(_bearer_check(admin_key))],
                          summary="Stop the server (Authorization: Bearer <serve.admin_key>)")

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        answer = error(exc.status_code, exc.detail)
        for key, value in (exc.headers or {}).items():
            answer.headers[key] = value
        return answer

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, f"request not understood: {exc.errors()[:1]}")

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(exc).__name__}); see the server log")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, crash)
    _document_predict(app)


def _bearer_check(key: str) -> Any:
    bearer = HTTPBearer(auto_error=False)

    def check(sent: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if sent is None or not secrets.compare_digest(sent.credentials, key):
            raise HTTPException(401, "missing or wrong 'Authorization: Bearer <serve.admin_key>' header")
    return check
