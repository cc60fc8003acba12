"""Where each supported architecture keeps its layers and sub-layers: the one per-family table.

Two sub-layer styles cover the supported encoders:

- ``output``: a module called as ``module(h_in, x)`` that computes ``LayerNorm(dropout(dense(h_in)) + x)``
  with attributes ``dense``, ``dropout`` and ``LayerNorm`` (BERT, RoBERTa, XLM-R, ELECTRA).
- ``block``: a module called as ``module(x, ...)`` that returns h (or a tuple starting with h); the
  enclosing block then computes ``layer_norm(h + x)`` itself (DistilBERT).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from mtl.errors import MTLConfigError


@dataclass(frozen=True)
class SubLayer:
    """One residual sub-layer of a transformer layer."""

    path: str  # module to wrap, relative to the layer
    style: str  # "output" | "block"
    layer_norm: str | None = None  # for "block": the LayerNorm the block applies after it


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family keeps its layer list and sub-layers."""

    layers: str  # path of the nn.ModuleList of layers, relative to the backbone
    attn: SubLayer
    ffn: SubLayer


_BERT_LIKE = ArchSpec("encoder.layer", SubLayer("attention.output", "output"), SubLayer("output", "output"))
ARCHS: dict[str, ArchSpec] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": ArchSpec(
        "transformer.layer",
        SubLayer("attention", "block", "sa_layer_norm"),
        SubLayer("ffn", "block", "output_layer_norm"),
    ),
}


def arch_spec(backbone: nn.Module) -> ArchSpec:
    """The table entry for a loaded backbone, or a one-line error naming the supported families."""
    model_type = backbone.config.model_type
    if model_type not in ARCHS:
        raise MTLConfigError(f"backbone model_type '{model_type}' is not supported, expected one of {sorted(ARCHS)}")
    return ARCHS[model_type]


def max_tokens(config: object) -> int:
    """The longest input (in tokens, special tokens included) the backbone's position embeddings allow."""
    positions = getattr(config, "max_position_embeddings", None) or 512
    # RoBERTa-style models number positions from padding_idx + 1, so two slots never hold a token
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    return positions - offset


def layer_list(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer layers."""
    return backbone.get_submodule(arch_spec(backbone).layers)


def embed(backbone: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings exactly as the backbone's own forward computes them."""
    kwargs = {"input_ids": input_ids}
    if token_type_ids is not None and "token_type_ids" in inspect.signature(backbone.embeddings.forward).parameters:
        kwargs["token_type_ids"] = token_type_ids
    hidden = backbone.embeddings(**kwargs)
    project = getattr(backbone, "embeddings_project", None)  # ELECTRA when embedding_size != hidden_size
    return project(hidden) if project is not None else hidden


def attention_mask_4d(backbone: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask every layer receives, built the way the backbone builds it (None when nothing is padded)."""
    return create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=attention_mask)
