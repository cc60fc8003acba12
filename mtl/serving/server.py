"""The LitServe server around `AdapterServingAPI`: request guard, ``GET /tasks``, the admin shutdown endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import litserve as ls
from fastapi import Depends
from starlette.responses import JSONResponse

from mtl.serving.api import STATUS_FILE, AdapterServingAPI, RequestGuard, error
from mtl.serving.store import AdapterStore

if TYPE_CHECKING:
    from mtl.serving.cli import ServeConfig


def build_server(config: ServeConfig, store: AdapterStore, backbone: str, runtime_dir: str,
                 api_class: type[AdapterServingAPI] = AdapterServingAPI) -> ls.LitServer:
    """A LitServer answering ``POST /predict`` from ``store`` and listing it at ``GET /tasks`` (``api_class``: a
    variant of the API, e.g. a benchmark's baseline)."""
    api = api_class(config.store, store.snapshot(), backbone, config.max_resident, config.poll_seconds,
                            runtime_dir, config.router, config.max_batch_size, config.batch_timeout, config.threads)
    server = ls.LitServer(api, accelerator="auto", devices=1, workers_per_device=1, timeout=config.timeout,
                          middlewares=[RequestGuard], enable_shutdown_api=True)
    status = Path(runtime_dir) / STATUS_FILE

    async def tasks() -> JSONResponse:
        # written by the inference worker whenever the store or its resident set changes
        try:
            return JSONResponse(json.loads(status.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            return error(503, "the inference worker is still starting")

    server.app.add_api_route("/tasks", tasks, methods=["GET"], dependencies=[Depends(server.setup_auth())])
    return server
