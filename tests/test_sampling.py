"""Grouping training batches by length, and evaluation batches of like lengths: coverage, order, ranks, padding."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from mtl.data.sampling import (TaskBatchSampler, group_by_length, length_batches, padding_fraction, pass_chunks,
                               sorted_by_length)
from mtl.errors import MTLConfigError

REPO = Path(__file__).resolve().parents[1]


def skewed_lengths(n: int, seed: int = 0, top: int = 64) -> list[int]:
    """Token counts like short texts: most short, a long tail, some at the truncation limit ``top``."""
    rng = random.Random(seed)
    return [min(top, 3 + int(rng.expovariate(1 / 20))) for _ in range(n)]


def epoch(sampler: TaskBatchSampler, number: int) -> list[list[int]]:
    sampler.set_epoch(number)
    return list(sampler)


def ranges_do_not_overlap(batches: list[list[int]], lengths: list[int]) -> bool:
    """Each batch's lengths form an interval, and no two intervals overlap (beyond a shared endpoint)."""
    spans = sorted(((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches), reverse=True)
    return all(low >= next_high for (low, _), (_, next_high) in zip(spans, spans[1:]))


# ---------------------------------------------------------------- coverage


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_one_task_every_index_once_per_epoch_on_every_rank_count(world_size):
    n = 203  # 203 % 24 and 203 % 16 leave uneven last chunks
    lengths = skewed_lengths(n)
    for number in range(3):
        per_rank = [epoch(TaskBatchSampler([n], 8, seed=4, rank=r, world_size=world_size, lengths=[lengths],
                                           group_batches=3), number) for r in range(world_size)]
        assert len({len(batches) for batches in per_rank}) == 1  # the same count on every rank, or DDP hangs
        assert len(per_rank[0]) == len(TaskBatchSampler([n], 8, world_size=world_size))  # grouping keeps the count
        seen = [i for batches in per_rank for b in batches for i in b]
        assert sorted(seen) == list(range(n))  # once each, none left out, over all ranks
        for step in zip(*per_rank):  # each step's rows are disjoint across ranks
            rows = [i for b in step for i in b]
            assert len(set(rows)) == len(rows) and min(map(len, step)) >= 1


def test_several_tasks_round_robin_every_index_once_and_one_task_per_batch():
    sizes = [64, 64, 64]  # round robin over 24 batches of 8: 8 per task, exactly one pass over each
    lengths = [skewed_lengths(n, seed) for seed, n in enumerate(sizes)]
    for world_size in (1, 2):
        per_rank = [epoch(TaskBatchSampler(sizes, 8 // world_size, "round_robin", seed=2, rank=r, world_size=world_size,
                                           lengths=lengths, group_batches=3), 0) for r in range(world_size)]
        for batches in per_rank:
            assert [b[0] // 64 for b in batches] == [0, 1, 2] * 8
            assert all(b[0] // 64 == b[-1] // 64 for b in batches)  # one task per batch
        assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(192))


# ---------------------------------------------------------------- order within buckets


def test_megabatches_are_sorted_longest_first_and_cut_to_the_same_sizes():
    lengths = skewed_lengths(100)
    perm = list(range(100))
    random.Random(1).shuffle(perm)
    chunks = pass_chunks(perm, 8, 1)  # 12 chunks of 8 and one of 4
    grouped = group_by_length(chunks, lengths, 5, random.Random(0))
    assert sorted(map(len, grouped)) == sorted(map(len, chunks))
    assert sorted(i for b in grouped for i in b) == list(range(100))
    for start in range(0, len(chunks), 5):  # megabatches: chunks 0-4, 5-9, 10-12
        members = {i for c in chunks[start:start + 5] for i in c}
        inside = [b for b in grouped if set(b) <= members]
        assert len(inside) == len(chunks[start:start + 5])  # no batch crosses a megabatch
        assert ranges_do_not_overlap(inside, lengths)  # contiguous runs of the sorted megabatch
        assert all(b == sorted(b, key=lambda i: -lengths[i]) for b in inside)
    # the batches are shuffled, not run from long to short
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_equal_lengths_keep_the_random_batches():
    # the sort is stable: with nothing to sort by, the batches are the ungrouped ones, in another order
    chunks = pass_chunks(random.Random(3).sample(range(50), 50), 8, 1)
    grouped = group_by_length(chunks, [7] * 50, 50, random.Random(0))
    assert sorted(map(sorted, grouped)) == sorted(map(sorted, chunks)) and grouped != chunks


def test_whole_pass_group_sorts_the_pass():
    lengths = skewed_lengths(160)
    batches = epoch(TaskBatchSampler([160], 16, seed=0, lengths=[lengths], group_batches=10), 0)
    assert len(batches) == 10 and ranges_do_not_overlap(batches, lengths)
    small = epoch(TaskBatchSampler([160], 16, seed=0, lengths=[lengths], group_batches=2), 0)
    assert not ranges_do_not_overlap(small, lengths)  # five separate megabatches overlap in length


# ---------------------------------------------------------------- seeds and epochs


def test_grouped_batches_depend_only_on_seed_and_epoch():
    lengths = [skewed_lengths(120), skewed_lengths(70, 1)]

    def make(seed: int = 9, **kwargs) -> TaskBatchSampler:
        return TaskBatchSampler([120, 70], 8, "temperature", seed=seed, lengths=lengths, group_batches=4, **kwargs)

    first = epoch(make(), 0)
    assert first == epoch(make(), 0) and first == list(make())
    assert epoch(make(), 1) != first and epoch(make(), 1) == epoch(make(), 1)
    assert epoch(make(seed=10), 0) != first
    now = {"epoch": 1}
    assert list(make(epoch_fn=lambda: now["epoch"])) == epoch(make(), 1)  # what Lightning's epoch says
    # grouping changes which rows share a batch, not the tasks' order (nor the sizes: uneven ends stay where they are)
    plain = epoch(TaskBatchSampler([120, 70], 8, "temperature", seed=9), 0)
    assert [b[0] >= 120 for b in plain] == [b[0] >= 120 for b in first] and first != plain


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_deal_out_the_one_process_grouped_batches(world_size):
    # uneven last chunks of at least world_size rows (so none joins the one before): 39 % 8, 39 % 12, 53 % 8, 53 % 12
    sizes = [39, 53]
    lengths = [skewed_lengths(39), skewed_lengths(53, 1)]
    for number in (0, 1):
        one = epoch(TaskBatchSampler(sizes, 4 * world_size, seed=5, lengths=lengths, group_batches=2), number)
        per_rank = [epoch(TaskBatchSampler(sizes, 4, seed=5, rank=r, world_size=world_size, lengths=lengths,
                                           group_batches=2), number) for r in range(world_size)]
        assert [len(b) for b in per_rank] == [len(one)] * world_size
        for step, batches in zip(one, zip(*per_rank)):
            assert sorted(i for b in batches for i in b) == sorted(step)  # disjoint shares of the same step
            assert max(map(len, batches)) - min(map(len, batches)) <= 1


def test_bad_lengths_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^lengths: got 3 lengths for task #1, expected one per example of sizes "
                                         r"\[4, 2\]$"):
        TaskBatchSampler([4, 2], 2, lengths=[[1, 2, 3, 4], [1, 2, 3]])
    with pytest.raises(ValueError, match=r"^lengths: got lengths for 1 tasks, expected one per example"):
        TaskBatchSampler([4, 2], 2, lengths=[[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"^group_batches=0: expected an int >= 1$"):
        TaskBatchSampler([4], 2, lengths=[[1, 2, 3, 4]], group_batches=0)


# ---------------------------------------------------------------- padding


def test_padding_of_a_sorted_pass_is_exact_and_far_below_random():
    # lengths 1..256, each once: a sorted pass cuts them into runs of 8 consecutive lengths, so every batch pads
    # 0 + 1 + ... + 7 = 28 tokens, 32 batches: 896 pad tokens; the batch of lengths 8k-7..8k costs 8 * 8k tokens
    lengths = random.Random(0).sample(range(1, 257), 256)
    grouped = epoch(TaskBatchSampler([256], 8, seed=1, lengths=[lengths], group_batches=32), 0)
    pads = 32 * 28
    total = sum(8 * 8 * k for k in range(1, 33))
    assert sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in grouped) == pads
    assert padding_fraction(grouped, lengths) == pads / total == pytest.approx(0.0265, abs=1e-4)
    plain = epoch(TaskBatchSampler([256], 8, seed=1), 0)
    assert padding_fraction(plain, lengths) > 0.3  # random batches of 8 out of 1..256 pad ~44%


def test_padding_falls_with_the_group_size_on_skewed_lengths():
    lengths = skewed_lengths(2000)
    fractions = [padding_fraction(epoch(TaskBatchSampler([2000], 32, seed=0, lengths=None if g is None else [lengths],
                                                         group_batches=g or 1), 0), lengths)
                 for g in (None, 1, 4, 16, 63)]
    random_fraction, per_batch, *grouped = fractions
    assert random_fraction > 0.4 and per_batch == random_fraction  # a group of one batch changes no batch
    assert grouped == sorted(grouped, reverse=True) and grouped[-1] < random_fraction / 10


def test_sorted_by_length_is_longest_first_and_stable():
    assert sorted_by_length([0, 2, 4, 6], [5, 0, 9, 0, 5, 0, 1]) == [2, 0, 4, 6]
    assert sorted_by_length(range(4), [3, 3, 3, 3]) == [0, 1, 2, 3]


def test_length_batches_cut_where_lengths_halve_largest_batch_first():
    lengths = [10, 128, 30, 60, 8, 50, 20]
    # longest first: 128 | 60 50 30 (full at 3) | 20 10 | 8 (under half of 20); padded sizes 128, 180, 40, 8
    assert length_batches(range(7), lengths, 3) == [[3, 5, 2], [1], [6, 0], [4]]
    assert length_batches(range(7), lengths, 10) == [[3, 5, 2], [1], [6, 0], [4]]
    assert length_batches([0, 2, 6], lengths, 2) == [[2, 6], [0]]  # only the given units
    assert length_batches(range(5), [4] * 5, 2) == [[0, 1], [2, 3], [4]]


# ---------------------------------------------------------------- the data module


@pytest.fixture(scope="module")
def tokenizer():
    from mtl.backbone import load_tokenizer

    return load_tokenizer("minilm-l6")


@pytest.fixture
def varied(tmp_path, tokenizer, monkeypatch):
    """A task whose texts range from 1 to 40 words (max_length 32), and a factory of data modules over it."""
    from mtl.data.module import TaskDataModule

    monkeypatch.setattr("mtl.data.module.load_tokenizer", lambda name: tokenizer)
    rng = random.Random(0)
    lines = ["text,label"] + [f"{' '.join(['word'] * rng.randint(1, 40))} {i},{'ab'[i % 2]}" for i in range(300)]
    (tmp_path / "varied.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "varied.yaml").write_text("source: {type: files, train: varied.csv}\ntext_fields: [text]\n"
                                          "label_field: label\nlabels: [a, b]\nmax_length: 32\n")

    def make(**kwargs) -> TaskDataModule:
        kwargs = {"batch_size": 8, "eval_batch_size": 6, **kwargs}
        return TaskDataModule(["varied"], tasks_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), **kwargs)

    return make


def mask_padding(batches) -> float:
    """Pad tokens / all tokens, counted in the collated attention masks."""
    masks = [b["attention_mask"] for b in batches]
    return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)


def loaders_rows(batches) -> list[int]:
    """Every row index the batches hold, sorted."""
    return sorted(i for b in batches for i in b["index"].tolist())


def test_data_module_groups_by_length_by_default_and_lengths_match_the_collator(varied, tokenizer, monkeypatch):
    dm = varied()
    assert dm.group_by_length is True and dm.group_batches == 50
    dm.setup("fit")

    def no_tokenising(self, *args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenising)  # lengths and batches come from the cache
    lengths = dm.token_lengths("varied", "train")
    assert len(lengths) == 240 and len(set(lengths)) > 10
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, TaskBatchSampler) and loader.batch_sampler.lengths == [lengths]
    batches = list(loader)
    assert [b["attention_mask"].sum(1).tolist() for b in batches] == [[lengths[i] for i in b["index"]] for b in batches]
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(240))
    grouped = mask_padding(batches)
    assert grouped == pytest.approx(padding_fraction([b["index"].tolist() for b in batches], lengths))
    assert grouped < mask_padding(list(varied(group_by_length=False).train_dataloader())) / 3


def test_data_module_groups_train_subsets_by_their_own_lengths(varied):
    rows = list(range(0, 240, 3))
    dm = varied(train_subsets={"varied": rows}, group_batches=100)
    full = dm.token_lengths("varied", "train")
    batches = list(dm.train_dataloader())
    assert loaders_rows(batches) == list(range(80))  # positions within the subset
    # one megabatch over the pass: the batches are runs of the subset's rows sorted by their lengths
    assert ranges_do_not_overlap([b["index"].tolist() for b in batches], [full[r] for r in rows])


def test_evaluation_batches_by_length_labels_aligned_predict_in_row_order(varied):
    dm = varied()
    dm.setup("fit")
    split = dm.task_datasets["varied"]["validation"]
    lengths = dm.token_lengths("varied", "validation")
    for split_name, loader in (("validation", dm.val_dataloader()[0]), ("test", dm.test_dataloader()[0]),
                               ("validation", dm.full_eval_loaders("validation")[0])):
        batches = [b["index"].tolist() for b in loader]
        assert batches == length_batches(range(30), dm.token_lengths("varied", split_name), 6)
    assert len(batches) > 30 / 6  # the lengths (1 to 32 tokens) halve more than once: some batches are cut short
    batches = list(dm.val_dataloader()[0])
    assert loaders_rows(batches) == list(range(30))
    for b in batches:  # each row's label and tokens travel with its index: metrics see the rows they score
        assert b["labels"].tolist() == [split[i]["labels"] for i in b["index"].tolist()]
        assert b["attention_mask"].sum(1).tolist() == [lengths[i] for i in b["index"].tolist()]
    assert mask_padding(batches) < mask_padding(list(dm.predict_dataloader()[0])) / 2
    predicted = [i for b in dm.predict_dataloader()[0] for i in b["index"].tolist()]
    assert predicted == list(range(30))  # predictions are written in the split's order


def test_each_rank_evaluates_its_rows_in_length_batches(varied):
    per_rank = {}
    for rank in range(2):
        dm = varied()
        dm.trainer = SimpleNamespace(global_rank=rank, local_rank=rank, world_size=2, current_epoch=0,
                                     _accelerator_connector=SimpleNamespace(use_distributed_sampler=False))
        lengths = dm.token_lengths("varied", "validation")
        per_rank[rank] = [i for b in dm.val_dataloader()[0] for i in b["index"].tolist()]
        batches = length_batches(range(rank, 30, 2), lengths, 6)
        assert per_rank[rank] == [i for batch in batches for i in batch]
        assert len(list(dm.train_dataloader())) == 15  # 240 rows / (8 x 2 ranks), grouped
    assert sorted(per_rank[0] + per_rank[1]) == list(range(30))


def test_group_batches_below_one_is_one_line(varied):
    with pytest.raises(MTLConfigError, match=r"^data.group_batches: got 0, expected an int >= 1$"):
        varied(group_batches=0)


def test_cli_reads_group_by_length(capsys):
    from mtl.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.group_by_length", "false",
              "--data.group_batches", "8", "--print_config"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "  group_by_length: false\n" in out and "  group_batches: 8\n" in out
