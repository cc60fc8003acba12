"""Multi-task batch sampling: every batch holds the examples of one task, optionally grouped by length.

Pure Python + torch's ``Sampler`` base class; no Lightning.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import groupby

from torch.utils.data import Sampler

from mtl.errors import MTLConfigError

STRATEGIES = ("proportional", "temperature", "uniform", "round_robin")
# Batches per length group (megabatch) when grouping by length. Padding falls fast as a group grows and is near its
# floor by ~50 batches on the example tasks (benchmarks/RESULTS.md, "Padding (group by length)"); a larger group only
# makes batches more alike from epoch to epoch (a group as large as the pass sorts the whole pass).
GROUP_BATCHES = 50


def task_probabilities(sizes: Sequence[int], strategy: str = "proportional", temperature: float = 2.0) -> list[float]:
    """Probability of drawing each task for the next batch (round_robin: its long-run frequency).

    proportional: p ~ n; temperature: p ~ n ** (1 / T) (T=1 is proportional, large T tends to
    uniform); uniform and round_robin: 1 / K. Tasks with no examples get 0.
    """
    if strategy not in STRATEGIES:
        raise MTLConfigError(f"sampling: got {strategy!r}, expected one of {list(STRATEGIES)}")
    if strategy == "temperature" and not temperature > 0:
        raise MTLConfigError(f"temperature: got {temperature!r}, expected a number > 0")
    if not sizes or any(n < 0 for n in sizes) or not any(sizes):
        raise ValueError(f"task sizes {list(sizes)}: expected non-negative counts, not all zero")
    if strategy == "proportional":
        weights = [float(n) for n in sizes]
    elif strategy == "temperature":
        weights = [n ** (1.0 / temperature) if n else 0.0 for n in sizes]
    else:
        weights = [1.0 if n else 0.0 for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class TaskBatchSampler(Sampler[list[int]]):
    """Batch sampler over ``ConcatDataset(per-task datasets)``; each batch is indices of one task.

    The task of each batch is drawn with ``task_probabilities`` (``round_robin`` cycles through
    the tasks in order instead). Within a task, examples are taken from a seeded permutation;
    when a task runs out it is reshuffled and restarted, so small tasks repeat under
    temperature / uniform sampling while large ones may not be exhausted in an epoch.

    Epoch length (per rank) = ceil(total examples / (batch_size * world_size)) batches (floor
    with ``drop_last``; one fewer where a last chunk joins the one before it, see below): an epoch
    is the amount of data of one pass over all tasks, whatever the strategy.

    Distributed: all ranks draw the same task sequence (each step trains the same task on every
    rank, so no parameter is unused on one rank only) and each step's ``batch_size * world_size``
    examples of that task are dealt out across ranks (``chunk[rank::world_size]``): within a
    pass over a task no example is given twice and none is left out, and a step's examples are
    those of a 1-process run with ``batch_size * world_size`` (the same permutation, cut at the
    same places). The last chunk of a pass may not split evenly: ranks then get batches that
    differ by one example (the training step weights each rank's mean loss by its share, see
    ``AdapterTrainer.rank_share``); a last chunk smaller than ``world_size``, which would leave a
    rank with nothing, joins the chunk before it (there, and only there, the batches differ from
    the 1-process run's). Every rank yields the same number of batches. Use the Trainer with
    ``use_distributed_sampler=False``.

    Grouping by length (``lengths``: each task's example lengths in tokens): each pass's global
    batches are cut as above, then every run of ``group_batches`` consecutive batches (a
    megabatch) is sorted longest first and cut again into batches of the same sizes, and the
    pass's batches are shuffled (see `group_by_length`). A batch then holds examples of similar
    length, so it is padded less, while which examples share a megabatch, and the order of the
    batches, stay random. Everything above holds unchanged: the same examples per pass, the same
    batch sizes and count, the same dealing out across ranks (each rank's share of a sorted global
    batch is as short as the others').

    Lightning does not call ``set_epoch`` on a batch sampler; pass ``epoch_fn`` (read when an
    epoch's iteration starts) or call ``set_epoch`` yourself. Randomness depends only on
    ``(seed, epoch)``, so runs are reproducible.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        strategy: str = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epoch_fn: Callable[[], int] | None = None,
        probabilities: Sequence[float] | None = None,
        lengths: Sequence[Sequence[int]] | None = None,
        group_batches: int = GROUP_BATCHES,
        example_rows: Sequence[int] | None = None,
    ) -> None:
        """See the class docstring; ``sizes`` are the task datasets' lengths in concatenation order;
        ``probabilities`` (one per task) replace the strategy's when given; ``lengths`` (one list per
        task, one token count per example) turn on grouping by length, ``group_batches`` per megabatch;
        ``example_rows`` (one per task, default 1): a task whose every example is that many consecutive
        rows (its answer choices) is drawn by examples, each batch holding ``batch_size`` whole examples."""
        self.rows_per = [int(g) for g in example_rows] if example_rows is not None else [1] * len(sizes)
        if len(self.rows_per) != len(sizes) or any(g < 1 or n % g for n, g in zip(sizes, self.rows_per)):
            raise ValueError(f"example_rows {list(self.rows_per)}: expected one int >= 1 per task, dividing its size "
                             f"(sizes {list(sizes)})")
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        # from here on the sampler counts examples; `_task_batches` expands an example into its rows
        sizes = [int(n) // g for n, g in zip(sizes, self.rows_per)]
        if lengths is not None:
            lengths = [unit_lengths(list(task_lengths), g) for task_lengths, g in zip(lengths, self.rows_per)]
        self.sizes = [int(n) for n in sizes]
        self.probs = task_probabilities(self.sizes, strategy, temperature)
        if probabilities is not None:
            weights = [float(w) if n else 0.0 for w, n in zip(probabilities, self.sizes)]
            if len(weights) != len(self.sizes) or any(w < 0 for w in weights) or not sum(weights) > 0:
                raise ValueError(f"probabilities {list(probabilities)}: expected {len(self.sizes)} non-negative "
                                 "numbers, not all zero")
            self.probs = [w / sum(weights) for w in weights]
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: expected 1 <= batch_size, 0 <= rank < world_size")
        need = batch_size * world_size if drop_last else world_size
        small = [i for i, n in enumerate(self.sizes) if 0 < n < need]
        if small:
            raise ValueError(f"task #{small[0]} has {self.sizes[small[0]]} examples, fewer than {need} (one per rank{', a full batch with drop_last' if drop_last else ''})")
        if group_batches < 1:
            raise ValueError(f"group_batches={group_batches}: expected an int >= 1")
        if lengths is not None:
            lengths = [list(task_lengths) for task_lengths in lengths]
            if len(lengths) != len(self.sizes):
                raise ValueError(f"lengths: got lengths for {len(lengths)} tasks, expected one per example of sizes "
                                 f"{self.sizes}")
            for i, (task_lengths, n) in enumerate(zip(lengths, self.sizes)):
                if len(task_lengths) != n:
                    raise ValueError(f"lengths: got {len(task_lengths)} lengths for task #{i}, expected one per "
                                     f"example of sizes {self.sizes}")
        self.lengths, self.group_batches = lengths, group_batches
        self.batch_size, self.strategy, self.seed = batch_size, strategy, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.epoch_fn = 0, epoch_fn

    def set_epoch(self, epoch: int) -> None:
        """Reseed for ``epoch`` (a new task sequence and new permutations)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank: as many as `pass_chunks` cuts all tasks' examples together into."""
        per_step = self.batch_size * self.world_size
        total = sum(self.sizes)
        if self.drop_last:
            return max(1, total // per_step)
        batches = math.ceil(total / per_step)
        if 0 < total % per_step < self.world_size and batches > 1:
            batches -= 1  # the last chunk joins the one before it (so one task's epoch is exactly one pass)
        return batches

    def task_sequence(self) -> list[int]:
        """The task index of each batch of the current epoch (identical on every rank)."""
        active = [i for i, n in enumerate(self.sizes) if n]
        if self.strategy == "round_robin":
            return [active[i % len(active)] for i in range(len(self))]
        rng = random.Random(f"{self.seed}:{self.epoch}:tasks")
        return rng.choices(range(len(self.sizes)), weights=self.probs, k=len(self))

    def __iter__(self) -> Iterator[list[int]]:
        """Yield ``len(self)`` batches of global (concatenated) indices."""
        if self.epoch_fn is not None:
            self.epoch = self.epoch_fn()
        streams = {t: self._task_batches(t) for t in range(len(self.sizes)) if self.sizes[t]}
        for task in self.task_sequence():
            yield next(streams[task])

    def _task_batches(self, task: int) -> Iterator[list[int]]:
        """Endless stream of this rank's batches of one task, one seeded permutation per pass."""
        n, step = self.sizes[task], self.batch_size * self.world_size
        for pass_no in range(10**12):
            perm = list(range(n))
            random.Random(f"{self.seed}:{self.epoch}:{task}:{pass_no}").shuffle(perm)
            chunks = pass_chunks(perm, step, self.world_size, self.drop_last)
            if self.lengths is not None:
                # its own Random: the permutation's draws stay what they were, so the pass keeps its examples
                order = random.Random(f"{self.seed}:{self.epoch}:{task}:{pass_no}:order")
                chunks = group_by_length(chunks, self.lengths[task], self.group_batches, order)
            group, start = self.rows_per[task], self.offsets[task]
            for chunk in chunks:
                yield [start + row for row in unit_rows(chunk[self.rank :: self.world_size], group)]


def pass_chunks(perm: list[int], step: int, world_size: int, drop_last: bool = False) -> list[list[int]]:
    """One pass's global batches: ``perm`` cut every ``step`` examples (see `TaskBatchSampler`).

    A short last chunk is dropped with ``drop_last``; otherwise, if it has fewer than ``world_size``
    examples, it joins the chunk before it (so that every rank gets at least one example, with no
    example repeated). Needs ``len(perm) >= world_size``.
    """
    chunks = [perm[start : start + step] for start in range(0, len(perm), step)]
    if chunks and len(chunks[-1]) < step:
        if drop_last:
            chunks.pop()
        elif len(chunks[-1]) < world_size and len(chunks) > 1:
            last = chunks.pop()
            chunks[-1] = chunks[-1] + last
    return chunks


def group_by_length(chunks: list[list[int]], lengths: Sequence[int], group_batches: int,
                    rng: random.Random) -> list[list[int]]:
    """The same examples in batches of the same sizes, each of similar lengths, in a shuffled order.

    Every run of ``group_batches`` consecutive ``chunks`` (a megabatch) is sorted by ``lengths``,
    longest first, and cut again into batches of its chunks' sizes; then ``rng`` shuffles the
    batches. The chunks come from a random permutation, so which examples meet in a megabatch
    is random; equal lengths keep that random order (the sort is stable).
    """
    grouped = []
    for start in range(0, len(chunks), group_batches):
        group = chunks[start : start + group_batches]
        rows = sorted((i for chunk in group for i in chunk), key=lengths.__getitem__, reverse=True)
        at = 0
        for chunk in group:
            grouped.append(rows[at : at + len(chunk)])
            at += len(chunk)
    # sorted megabatches in a row would run every epoch from long to short batches; shuffling spreads them out
    rng.shuffle(grouped)
    return grouped


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Pad tokens / all tokens when each batch is padded to its longest example (as the collator pads)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return (padded - real) / padded if padded else 0.0


def unit_rows(units: Sequence[int], group: int) -> list[int]:
    """The rows of ``units`` (examples) where every example is ``group`` consecutive rows, in the units' order."""
    return [u * group + j for u in units for j in range(group)]


def unit_lengths(lengths: Sequence[int], group: int) -> list[int]:
    """Each example's length where every example is ``group`` consecutive rows: its longest row's (what it pads to)."""
    return [max(lengths[at:at + group]) for at in range(0, len(lengths), group)]


def sorted_by_length(rows: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """``rows`` longest first, equal lengths in their given order: evaluation batches padded little."""
    return sorted(rows, key=lambda row: lengths[row], reverse=True)


def shard_rows(size: int, rank: int, world_size: int) -> list[int]:
    """The rows of a ``size``-row evaluation split that ``rank`` evaluates: every ``world_size``-th, no padding."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    return list(range(rank, size, world_size))


def length_batches(units: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """``units`` longest first, cut into batches of at most ``batch_size`` and also where the next unit is shorter
    than half its batch's longest (so no unit is padded to more than twice its length); the batches are returned
    largest first (units x longest length: their padded size), so the first one shows a lack of memory."""
    batches: list[list[int]] = []
    for unit in sorted_by_length(units, lengths):
        if not batches or len(batches[-1]) == batch_size or 2 * lengths[unit] < lengths[batches[-1][0]]:
            batches.append([])
        batches[-1].append(unit)
    return sorted(batches, key=lambda batch: len(batch) * lengths[batch[0]], reverse=True)


def whole_example_batches(examples: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of consecutive rows, cut only where the example changes, so that the rows (windows) of one example
    are in one batch: a batch holds at most ``batch_size`` rows, or one example's rows when it has more.
    ``examples``: each row's example, rows of one example next to each other."""
    batches: list[list[int]] = []
    current: list[int] = []
    for _, run in groupby(range(len(examples)), key=examples.__getitem__):
        rows = list(run)
        if current and len(current) + len(rows) > batch_size:
            batches.append(current)
            current = []
        current += rows
    if current:
        batches.append(current)
    return batches


class FixedBatches(Sampler):
    """A batch sampler that yields the same given batches (lists of dataset positions) every pass."""

    def __init__(self, batches: list[list[int]]) -> None:
        """``batches``: positions into the dataset, in the order they run."""
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
