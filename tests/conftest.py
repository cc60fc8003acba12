"""Tiny random backbones of every supported family (built from configs, no files)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, ElectraConfig, ElectraModel,
                          RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]
SIZE = dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def tiny_backbone(family: str = "bert", seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-64 random encoder of the given family."""
    torch.manual_seed(seed)
    if family == "bert":
        model = BertModel(BertConfig(**SIZE), add_pooling_layer=False)
    elif family == "roberta":
        model = RobertaModel(RobertaConfig(**SIZE, pad_token_id=1), add_pooling_layer=False)
    elif family == "xlm-roberta":
        model = XLMRobertaModel(XLMRobertaConfig(**SIZE, pad_token_id=1), add_pooling_layer=False)
    elif family == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=260, dim=64, n_layers=2, n_heads=2, hidden_dim=128))
    elif family == "electra":
        model = ElectraModel(ElectraConfig(**SIZE, embedding_size=32))
    else:
        raise ValueError(family)
    return model.eval()


def tiny_batch(rows: int = 4, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids with some right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 260, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, length - r:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
