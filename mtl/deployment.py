"""`Deployment`: what one answers requests with: a model, the router beside it (if any), and where they came from.

The model knows no routers and no files; a saved setup folder (``adapters/``, ``fusions/``, ``router/``) is read
and written here, through `mtl.model_files` and `mtl.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtl import model_files
from mtl.errors import MTLConfigError
from mtl.model import MTLModel
from mtl.routing import ROUTER_CONFIG, Router, load_router

ROUTER_DIR = "router"


@dataclass
class Deployment:
    """A model with the router that picks its task for texts that come without one, and the folder they came from."""

    model: MTLModel
    router: Router | None = None
    source: Path | None = None

    def check_router(self, where: str = "router") -> None:
        """The router routes only to tasks the model has (one line otherwise)."""
        if self.router is None:
            return
        missing = [t for t in self.router.tasks if t not in self.model.records]
        if missing:
            raise MTLConfigError(f"{where}: routes to {missing}, which the model does not have "
                                 f"(model tasks: {self.model.tasks})")

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Every task, every fusion and the router (``router/``) in one folder written atomically."""
        self.check_router()
        router = self.router if self.router is not None and self.router.tasks else None
        return model_files.save_pretrained(self.model, folder, overwrite,
                                           extra=None if router is None else lambda tmp: router.save(tmp / ROUTER_DIR))

    @classmethod
    def load(cls, folder: str | Path, backbone: str | None = None) -> Deployment:
        """The model saved in ``folder`` (`MTLModel.from_pretrained`) and its router (``router/``) if it has one."""
        folder = Path(folder)
        model = MTLModel.from_pretrained(folder, backbone)
        router = load_router(folder / ROUTER_DIR) if (folder / ROUTER_DIR / ROUTER_CONFIG).is_file() else None
        deployment = cls(model, router, folder)
        deployment.check_router(str(folder / ROUTER_DIR))
        return deployment
