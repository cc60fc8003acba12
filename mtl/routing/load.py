"""Reading a saved router folder back, whichever kind it is."""

from __future__ import annotations

from pathlib import Path

from mtl.atomic import recover
from mtl.errors import MTLConfigError
from mtl.routing.base import ROUTER_CONFIG, ROUTER_FORMAT_VERSION, ROUTER_WEIGHTS
from mtl.routing.entropy import EntropyRouter
from mtl.routing.prototype import SCHEMA, PrototypeRouter
from mtl.storage import check_shape, read_config, read_tensors

ENTROPY_SCHEMA = {"kind": str, "format_version": int, "tasks?": [str]}


def load_router(folder: str | Path) -> EntropyRouter | PrototypeRouter:
    """The router saved in ``folder`` (``router.json``, plus ``router.safetensors`` for prototypes), checked."""
    folder = Path(folder)
    recover(folder.parent, folder.name)  # an overwrite killed between its two renames leaves the folder as .old
    config = read_config(folder, ROUTER_CONFIG, {"kind": str, "format_version": int})
    source = folder / ROUTER_CONFIG
    if config["format_version"] != ROUTER_FORMAT_VERSION:
        raise MTLConfigError(f"{source}: format_version {config['format_version']!r}, expected {ROUTER_FORMAT_VERSION}")
    if config["kind"] == EntropyRouter.kind:
        check_shape(source, config, ENTROPY_SCHEMA)
        return EntropyRouter(config.get("tasks"))
    if config["kind"] == PrototypeRouter.kind:
        check_shape(source, config, SCHEMA)
        return PrototypeRouter.from_files(folder, config, read_tensors(folder / ROUTER_WEIGHTS))
    raise MTLConfigError(f"{source}: kind: got {config['kind']!r:.60}, expected "
                         f"'{EntropyRouter.kind}' or '{PrototypeRouter.kind}'")
