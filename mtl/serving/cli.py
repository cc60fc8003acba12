"""``train.py serve``: one backbone, a store of adapters, LitServe with dynamic batching.

    python train.py serve --config configs/serve.yaml [--serve.store DIR] [--serve.port 8000] ...

Everything is checked before the server starts (the store indexed, the backbone's config read), so a mistake is
one line and exit 2 with nothing started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from argparse import ArgumentError
from dataclasses import dataclass

from jsonargparse import ActionConfigFile, ArgumentParser

from mtl.backbone import load_backbone_config
from mtl.cli_errors import config_files, explain_parse_error
from mtl.errors import MTLConfigError
from mtl.serving.store import AdapterStore

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
ROUTERS = ("auto", "entropy", "none")


@dataclass
class ServeConfig:
    """Settings of ``train.py serve``.

    Args:
        store: A run folder, a continual stage folder, or a folder of run folders (what fit / continual export).
        host: Address to bind: 127.0.0.1 (this machine only, the default), or 0.0.0.0 / :: to listen on every interface.
        port: TCP port (1024-65535).
        backbone: Backbone to serve with (None: the one the store's parts were trained on).
        max_resident: Tasks and fusions kept loaded; the least recently used is evicted beyond it.
        max_batch_size: Requests LitServe gathers into one forward.
        batch_timeout: Seconds LitServe waits to fill a batch.
        poll_seconds: How often the store is rescanned for new, replaced or removed exports.
        router: For requests without 'task': 'auto' (the store's router/ if any, else entropy), 'entropy', 'none'.
        api_key: Key every request must send as X-API-Key (None: predictions and /tasks are open).
        admin_key: Bearer key of the admin endpoint POST /shutdown (None: LIT_SHUTDOWN_API_KEY, else one is generated
            and printed).
        threads: torch threads of the inference worker (None: torch's default).
        timeout: Seconds a request may wait for its answer before a 504.
    """

    store: str
    host: str = "127.0.0.1"
    port: int = 8000
    backbone: str | None = None
    max_resident: int = 64
    max_batch_size: int = 32
    batch_timeout: float = 0.01
    poll_seconds: float = 2.0
    router: str = "auto"
    api_key: str | None = None
    admin_key: str | None = None
    threads: int | None = None
    timeout: float = 30.0

    def check(self) -> None:
        """One line for the first setting that cannot work."""
        if self.host not in HOSTS:
            raise MTLConfigError(f"serve.host: got {self.host!r}, expected one of {list(HOSTS)}")
        if not 1024 <= self.port <= 65535:
            raise MTLConfigError(f"serve.port: got {self.port}, expected 1024-65535")
        if self.router not in ROUTERS:
            raise MTLConfigError(f"serve.router: got {self.router!r}, expected one of {list(ROUTERS)}")
        for key in ("max_resident", "max_batch_size"):
            if getattr(self, key) < 1:
                raise MTLConfigError(f"serve.{key}: got {getattr(self, key)}, expected an int >= 1")
        for key in ("batch_timeout", "poll_seconds", "timeout"):
            if getattr(self, key) < 0 or (key != "batch_timeout" and getattr(self, key) == 0):
                raise MTLConfigError(f"serve.{key}: got {getattr(self, key)}, expected a positive number of seconds")
        if self.threads is not None and self.threads < 1:
            raise MTLConfigError(f"serve.threads: got {self.threads}, expected an int >= 1 or null")


def build_parser() -> ArgumentParser:
    """The ``serve`` parser: ``--config`` YAML files and ``--serve.*`` options."""
    parser = ArgumentParser(prog="train.py serve", exit_on_error=False, parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with a serve: section")
    parser.add_class_arguments(ServeConfig, "serve")
    return parser


def parse(argv: list[str]) -> ServeConfig:
    """The checked settings of ``argv`` (after ``serve``)."""
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:
        keys = sorted({a.dest for a in parser._actions})
        raise MTLConfigError(explain_parse_error(str(err), keys, config_files(argv))) from None
    config = ServeConfig(**cfg.serve.as_dict())
    config.check()
    return config


def serve_main(argv: list[str]) -> None:
    """Check everything, then serve until stopped (Ctrl-C or POST /shutdown)."""
    config = parse(argv)
    store = AdapterStore(config.store, config.max_resident)
    backbone = config.backbone or store.backbone()
    load_backbone_config(backbone)  # an unknown or missing backbone is one line here, not a worker crash later
    # LitServe reads its keys from the environment when it is imported
    if config.api_key:
        os.environ["LIT_SERVER_API_KEY"] = config.api_key
    if config.admin_key:
        os.environ["LIT_SHUTDOWN_API_KEY"] = config.admin_key
    from mtl.serving.server import build_server  # noqa: PLC0415 - after the keys are in the environment

    runtime = tempfile.mkdtemp(prefix="mtl-serve-")
    server = build_server(config, store, backbone, runtime)
    entries = store.snapshot()
    fusions = sum(e.kind == "fusion" for e in entries.values())
    print(f"serve: store {config.store}: {len(entries) - fusions} tasks, {fusions} fusions; max_resident "
          f"{config.max_resident}; backbone {backbone}; http://{config.host}:{config.port} "
          f"(POST /predict, GET /tasks, GET /health)", flush=True)
    try:
        server.run(host=config.host, port=config.port, generate_client_file=False, log_level="warning",
                   num_api_servers=1)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
