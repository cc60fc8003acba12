"""``train.py serve``: one backbone, a store of adapters, LitServe with dynamic batching.

    python train.py serve --config configs/serve.yaml [--serve.store DIR] [--serve.port 8000] ...

Everything is checked before the server starts (the settings, the port, the store indexed, the backbone's config
read), so a mistake is one line and exit 2 with nothing started. `MTLServer` then runs and supervises the processes.
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from dataclasses import dataclass

from jsonargparse import ActionConfigFile, ArgumentParser

from mtl.backbone import load_backbone_config
from mtl.cli_errors import config_files, explain_parse_error
from mtl.errors import MTLConfigError
from mtl.precision import accelerator_kind, auto_precision
from mtl.serving.say import say
from mtl.serving.store import AdapterStore

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
ROUTERS = ("auto", "entropy", "none")
PRECISIONS = ("auto", "32-true", "bf16-mixed")
ACCELERATORS = ("auto", "cpu", "cuda")


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
        router: For requests without 'task': 'auto' (the store's router/, else such requests get a 400), 'entropy'
            (every task scores the text; unreliable without a trained router), 'none' (a task is required).
        api_key: Key every request must send as X-API-Key (None: predictions, /tasks and /metrics are open; /health
            and /ready are always open).
        admin_key: Bearer key of POST /shutdown (None: no shutdown endpoint; SIGTERM or Ctrl-C stop the server).
        threads: torch threads of the inference worker (None: torch's default, one per core).
        timeout: Seconds a request may wait for its answer before a 504; also the longest a stop waits for the
            requests in flight.
        precision: 'auto' (the rule of fit and predict: bf16-mixed where the hardware computes bf16 natively, else
            32-true), '32-true' or 'bf16-mixed'.
        accelerator: 'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu' or 'cuda'.
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
    precision: str = "auto"
    accelerator: str = "auto"

    def check(self) -> None:
        """One line for the first setting that cannot work."""
        if self.host not in HOSTS:
            raise MTLConfigError(f"serve.host: got {self.host!r}, expected one of {list(HOSTS)}")
        if not 1024 <= self.port <= 65535:
            raise MTLConfigError(f"serve.port: got {self.port}, expected 1024-65535")
        for key, choices in (("router", ROUTERS), ("precision", PRECISIONS), ("accelerator", ACCELERATORS)):
            if getattr(self, key) not in choices:
                raise MTLConfigError(f"serve.{key}: got {getattr(self, key)!r}, expected one of {list(choices)}")
        for key in ("max_resident", "max_batch_size"):
            if getattr(self, key) < 1:
                raise MTLConfigError(f"serve.{key}: got {getattr(self, key)}, expected an int >= 1")
        for key in ("batch_timeout", "poll_seconds", "timeout"):
            if getattr(self, key) < 0 or (key != "batch_timeout" and getattr(self, key) == 0):
                raise MTLConfigError(f"serve.{key}: got {getattr(self, key)}, expected a positive number of seconds")
        if self.threads is not None and self.threads < 1:
            raise MTLConfigError(f"serve.threads: got {self.threads}, expected an int >= 1 or null")
        if self.accelerator == "cuda" and accelerator_kind("cuda") != "cuda":
            raise MTLConfigError("serve.accelerator: cuda, but torch sees no CUDA GPU; expected auto or cpu")
        if self.batch_timeout >= self.timeout:
            raise MTLConfigError(f"serve.batch_timeout: {self.batch_timeout} s, expected less than serve.timeout "
                                 f"({self.timeout} s)")

    def device(self) -> str:
        """'cpu' or 'cuda' for ``accelerator``."""
        return "cuda" if accelerator_kind(self.accelerator) == "cuda" else "cpu"

    def resolved_precision(self) -> tuple[str, str]:
        """(precision, the line to print): the user's, else the rule fit and predict use (`auto_precision`)."""
        if self.precision != "auto":
            return self.precision, f"precision: {self.precision} (serve.precision)"
        precision, reason = auto_precision(self.device())
        return precision, f"precision: {precision} ({reason}; the same rule as fit and predict; set serve.precision)"


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


def serve_main(argv: list[str], api_class: type | None = None) -> None:
    """Check everything, then serve until stopped (SIGTERM, Ctrl-C or POST /shutdown); exits with the server's code.
    ``api_class``: a variant of `AdapterServingAPI` (a benchmark's baseline)."""
    config = parse(argv)
    # LitServe and torch are imported only once the settings are known to be good
    from mtl.serving.api import AdapterServingAPI  # noqa: PLC0415
    from mtl.serving.server import MTLServer, bind  # noqa: PLC0415

    try:
        sock = bind(config.host, config.port)  # first: a busy port must not cost an index or a worker start
    except OSError as err:
        raise MTLConfigError(f"serve.port: {config.host}:{config.port} cannot be bound ({err.strerror}), expected a "
                             "free port") from None
    store = AdapterStore(config.store, config.max_resident, say=say)  # each refused part: one line, now
    backbone = config.backbone or store.backbone()
    load_backbone_config(backbone)  # an unknown or missing backbone is one line here, not a worker crash later
    precision, line = config.resolved_precision()
    entries = store.snapshot()
    api = (api_class or AdapterServingAPI)(config.store, entries, backbone, config.max_resident, config.poll_seconds,
                                           config.router, config.max_batch_size, config.batch_timeout,
                                           config.threads, precision)
    server = MTLServer(api, config, config.device())
    servable = [e for e in entries.values() if e.error is None]
    fusions = sum(e.kind == "fusion" for e in servable)
    say(f"store {config.store}: {len(servable) - fusions} tasks, {fusions} fusions; max_resident "
        f"{config.max_resident}; backbone {backbone}; {line}; starting on http://{config.host}:{config.port}")
    sys.exit(server.serve(sock, f"http://{config.host}:{config.port}"))
