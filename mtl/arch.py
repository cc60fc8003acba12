"""Where each supported architecture keeps its layers and sub-layers, and what its layers receive: the one
per-family table.

Two sub-layer styles cover the supported encoders:

- ``output``: a module called as ``module(h_in, x)`` that computes ``LayerNorm(dropout(dense(h_in)) + x)``
  with attributes ``dense``, ``dropout`` and ``LayerNorm`` (BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2/v3).
- ``block``: a module called as ``module(x, ...)`` that returns h (or a tuple starting with h); the enclosing
  block adds h to its residual stream itself: then a LayerNorm (DistilBERT, post-norm), or nothing (ModernBERT,
  pre-norm, where x is the normed stream). An adapter with ``original_ln_before`` reads ``norm(h + x)`` with the
  norm named in the table (none: ``h + x``), as AdapterHub's hooks do.

Layers receive more than the hidden states: an attention mask (BERT family), DeBERTa's relative positions and
relative embeddings (and its convolution after layer 0, where configured), ModernBERT's rotary tables and its
alternating global / sliding-window masks, then its final norm. A `LayerLoop` per family builds those once per
forward exactly as the backbone's own forward does, and calls one layer; the model's loop does the rest.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from mtl.errors import MTLConfigError


def repeat_rows(tensor: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    """Stack ``copies`` copies of a batch along the row dimension (None stays None)."""
    if tensor is None or copies == 1:
        return tensor
    return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))


@dataclass(frozen=True)
class LayerInputs:
    """What every layer call receives besides the hidden states: ``rows`` has one entry per input row (copied
    with the rows in a multi-task forward), ``shared`` is the same for every row (position tables)."""

    rows: dict[str, torch.Tensor | None]
    shared: dict[str, Any] = field(default_factory=dict)

    def repeat(self, copies: int) -> LayerInputs:
        """The inputs for ``copies`` stacked copies of the rows."""
        if copies == 1:
            return self
        return LayerInputs({k: repeat_rows(v, copies) for k, v in self.rows.items()}, self.shared)


class LayerLoop:
    """BERT-style encoders: token embeddings, one attention mask for every layer, no final norm."""

    def embed(self, backbone: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings exactly as the backbone's own forward computes them."""
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None and "token_type_ids" in inspect.signature(backbone.embeddings.forward).parameters:
            kwargs["token_type_ids"] = token_type_ids
        hidden = backbone.embeddings(**kwargs)
        project = getattr(backbone, "embeddings_project", None)  # ELECTRA when embedding_size != hidden_size
        return project(hidden) if project is not None else hidden

    def inputs(self, backbone: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> LayerInputs:
        """The mask every layer receives, built the way the backbone builds it (None when nothing is padded)."""
        mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return LayerInputs({"mask": mask})

    def call(self, backbone: nn.Module, index: int, layer: nn.Module, hidden: torch.Tensor,
             inputs: LayerInputs) -> torch.Tensor:
        """One layer on ``hidden`` (whose rows may be copies of the rows ``inputs`` was built for)."""
        return _first(layer(hidden, _fit(inputs, hidden).rows["mask"]))

    def finish(self, backbone: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the backbone applies after its last layer."""
        return hidden


class DebertaLoop(LayerLoop):
    """DeBERTa-v2/v3: embeddings zeroed at padding, a pairwise mask, relative positions and (layer-normed) relative
    embeddings shared by every layer, and a convolution mixed in after layer 0 where ``conv_kernel_size > 0``."""

    def embed(self, backbone, input_ids, token_type_ids, attention_mask):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=mask)

    def inputs(self, backbone, hidden, attention_mask):
        encoder = backbone.encoder
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        return LayerInputs({"mask": encoder.get_attention_mask(attention_mask), "input_mask": attention_mask},
                           {"relative_pos": encoder.get_rel_pos(hidden), "rel_embeddings": encoder.get_rel_embedding()})

    def call(self, backbone, index, layer, hidden, inputs):
        out = _first(layer(hidden, _fit(inputs, hidden).rows["mask"], **inputs.shared))
        conv = backbone.encoder.conv
        if index == 0 and conv is not None:
            copies = out.shape[0] // hidden.shape[0]  # a slot of this layer may have copied the rows
            out = conv(repeat_rows(hidden, copies), out, _fit(inputs, out).rows["input_mask"])
        return out


class ModernBertLoop(LayerLoop):
    """ModernBERT: normed token embeddings, rotary tables and a mask per attention type (global, or sliding window
    in the local layers), and a final norm. Exact on the padded path, the only one transformers 5 runs."""

    def embed(self, backbone, input_ids, token_type_ids, attention_mask):
        return backbone.embeddings(input_ids=input_ids)

    def inputs(self, backbone, hidden, attention_mask):
        kwargs = {"config": backbone.config, "inputs_embeds": hidden, "attention_mask": attention_mask}
        masks = {"full_attention": create_bidirectional_mask(**kwargs),
                 "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs)}
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        tables = {kind: backbone.rotary_emb(hidden, positions, kind) for kind in set(backbone.config.layer_types)}
        return LayerInputs(masks, {"rotary": tables})

    def call(self, backbone, index, layer, hidden, inputs):
        kind = layer.attention_type
        return _first(layer(hidden, attention_mask=_fit(inputs, hidden).rows[kind],
                            position_embeddings=inputs.shared["rotary"][kind]))

    def finish(self, backbone, hidden):
        return backbone.final_norm(hidden)


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _fit(inputs: LayerInputs, hidden: torch.Tensor) -> LayerInputs:
    """The inputs for ``hidden``, whose rows are whole copies of the rows the inputs were built for."""
    built = next((v.shape[0] for v in inputs.rows.values() if v is not None), hidden.shape[0])
    return inputs.repeat(hidden.shape[0] // built) if hidden.shape[0] != built else inputs


@dataclass(frozen=True)
class SubLayer:
    """One residual sub-layer of a transformer layer."""

    path: str  # module to wrap, relative to the layer
    style: str  # "output" | "block"
    layer_norm: str | None = None  # for "block": the norm over (h + x) an original_ln_before adapter reads (None: h + x)


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family keeps its layer list and sub-layers, and how its layers are called."""

    layers: str  # path of the nn.ModuleList of layers, relative to the backbone
    attn: SubLayer
    ffn: SubLayer
    loop: LayerLoop = LayerLoop()


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
    "deberta-v2": ArchSpec("encoder.layer", SubLayer("attention.output", "output"), SubLayer("output", "output"),
                           DebertaLoop()),
    # pre-norm: the attention and MLP modules receive the normed stream; AdapterHub's interface for ModernBERT reads
    # mlp_norm after the attention and no norm after the MLP (layer_ln_1 / layer_ln_2)
    "modernbert": ArchSpec("layers", SubLayer("attn", "block", "mlp_norm"), SubLayer("mlp", "block"),
                           ModernBertLoop()),
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
