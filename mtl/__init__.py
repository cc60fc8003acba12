"""mtl: multi-task and continual learning with adapters on a frozen Hugging Face encoder."""

from mtl.adapters.config import AdapterConfig
from mtl.errors import MTLConfigError
from mtl.model import MTLModel

__all__ = ["AdapterConfig", "MTLConfigError", "MTLModel"]
__version__ = "0.1.0"
