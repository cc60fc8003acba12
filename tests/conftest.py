"""Shared test fixtures: tiny random backbones of every family, a tiny local backbone folder, keyword tasks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertModel, DebertaV2Config, DebertaV2Model, DistilBertConfig, DistilBertModel,
                          ElectraConfig, ElectraModel, ModernBertConfig, ModernBertModel, RobertaConfig, RobertaModel,
                          XLMRobertaConfig, XLMRobertaModel)

from mtl import model_files
from mtl.backbone import load_tokenizer
from mtl.model import MTLModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "modernbert"]
SIZE = dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def tiny_backbone(family: str = "bert", seed: int = 0, conv: int = 0) -> torch.nn.Module:
    """A 2-layer (ModernBERT: 3, global / local / global), hidden-64 random encoder of the given family; ``conv``:
    DeBERTa's convolution kernel after layer 0 (0: none, as in DeBERTa-v3)."""
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
    elif family == "deberta-v2":  # DeBERTa-v3's settings: relative attention in buckets, no absolute positions
        model = DebertaV2Model(DebertaV2Config(
            **SIZE, relative_attention=True, position_buckets=8, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0,
            conv_kernel_size=conv))
    elif family == "modernbert":  # window 4: the tiny batches' 9 tokens reach past it in the local layers
        model = ModernBertModel(ModernBertConfig(
            **{**SIZE, "num_hidden_layers": 3}, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2))
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


WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "seven", "table"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny BERT with the MiniLM tokenizer, saved as a local Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    load_tokenizer("minilm-l6").save_pretrained(path)
    return path


def keyword_task(path: Path, name: str, labels: list[str], rows: int = 240, seed: int = 0) -> None:
    """Write a task whose label is the one label word that occurs in the sentence."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        label = labels[i % len(labels)]
        words = rng.sample(WORDS, 4)
        words.insert(rng.randrange(5), label)
        lines.append(f"{' '.join(words)} {i},{label}")
    (path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    (path / f"{name}.yaml").write_text(
        f"source: {{type: files, train: {name}.csv}}\ntext_fields: [text]\nlabel_field: label\n"
        f"labels: [{', '.join(labels)}]\nmax_length: 16\n")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Keyword tasks: 'keyword' (bad/good) and 'colour' (red/blue/pink); a tagging task 'tagger' (KEY entities)."""
    path = tmp_path_factory.mktemp("tasks")
    keyword_task(path, "keyword", ["bad", "good"])
    keyword_task(path, "colour", ["red", "blue", "pink"], rows=180, seed=1)
    tagging_task(path, "tagger")
    qa_task(path, "qa")
    choice_task(path, "choice")
    return path


def export_random_tasks(backbone: Path, run: Path) -> MTLModel:
    """Export 'keyword' (bad/good) and 'colour' (red/blue/pink) with random adapters and heads under ``run/adapters``
    (so predictions differ per text); returns the model."""
    model = MTLModel(str(backbone))
    model.add_task("keyword", 2, labels=["bad", "good"])
    model.add_task("colour", 3, labels=["red", "blue", "pink"])
    with torch.no_grad():
        for task in model.tasks:
            for p in model.task_parameters(task).values():
                p.normal_(0, 0.2)
    for task in model.tasks:
        model_files.save_task(model, task, run / "adapters")
    return model


def tagging_task(path: Path, name: str = "tagger", rows: int = 200, seed: int = 0, max_length: int = 16) -> None:
    """Write a tagging task (JSONL tokens / tags): 'good' or 'bad' starts a KEY entity that the next word continues
    when it is 'river'; every other word is O."""
    import json

    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        words = rng.sample(WORDS, rng.randrange(3, 7))
        at = rng.randrange(len(words) + 1)
        words[at:at] = [rng.choice(["good", "bad"])] + (["river"] if rng.random() < 0.5 else [])
        tags = ["O"] * len(words)
        tags[at] = "B-KEY"
        if at + 1 < len(words) and words[at + 1] == "river":
            tags[at + 1] = "I-KEY"
        lines.append(json.dumps({"tokens": words, "tags": tags}))
    (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (path / f"{name}.yaml").write_text(
        f"source: {{type: files, train: {name}.jsonl}}\ntext_fields: [tokens]\nlabel_field: tags\n"
        f"labels: [O, B-KEY, I-KEY]\nproblem: token_classification\nmax_length: {max_length}\ndoc_stride: 4\n")


def qa_task(path: Path, name: str = "qa", rows: int = 200, seed: int = 0, max_length: int = 24,
            no_answer: bool = False) -> None:
    """Write an extractive QA task (JSONL question / context / answers): the answer to "which colour" is the one
    colour word (red, blue or pink) among 4 to 24 other words; long contexts take several windows. With
    ``no_answer``, every third context has no colour word and no answer (and the spec says ``no_answer: true``)."""
    import json

    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(4, 25))]
        if no_answer and i % 3 == 0:
            lines.append(json.dumps({"question": "which colour?", "context": " ".join(words), "answers": []}))
            continue
        at = rng.randrange(len(words) + 1)
        words.insert(at, rng.choice(["red", "blue", "pink"]))
        context = " ".join(words)
        start = len(" ".join(words[:at])) + (1 if at else 0)
        lines.append(json.dumps({"question": "which colour?", "context": context,
                                 "answers": [{"text": words[at], "answer_start": start}]}))
    (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (path / f"{name}.yaml").write_text(
        f"source: {{type: files, train: {name}.jsonl}}\ntext_fields: [question, context]\nlabel_field: answers\n"
        f"problem: extractive_qa\nmax_length: {max_length}\ndoc_stride: 6\n" + ("no_answer: true\n" if no_answer else ""))


def choice_task(path: Path, name: str = "choice", rows: int = 200, seed: int = 0, max_length: int = 16) -> None:
    """Write a multiple-choice task (JSONL context / question / choices / label): of 3 choices, the right one is the
    only colour word (red, blue or pink); labels alternate between the index, the position's name and the choice's
    text."""
    import json

    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        choices = rng.sample(WORDS, 2)
        right = rng.randrange(3)
        choices.insert(right, rng.choice(["red", "blue", "pink"]))
        label = [right, "ABC"[right], choices[right]][i % 3]
        lines.append(json.dumps({"context": " ".join(rng.sample(WORDS, 4)) + f" {i}", "question": "which colour?",
                                 "choices": choices, "label": label}))
    (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (path / f"{name}.yaml").write_text(
        f"source: {{type: files, train: {name}.jsonl}}\ntext_fields: [context, question, choices]\nlabel_field: label\n"
        f"labels: [A, B, C]\nproblem: multiple_choice\nmax_length: {max_length}\n")
