"""Task kinds: what differs between kinds of tasks lives here, one file per kind, and nowhere else.

The model runs the backbone, the adapters and the fusions for every row in the same way whatever the task (DESIGN:
the forward contract); a head gets the hidden states of all its rows' tokens and their mask. A task's kind, named by
its spec's ``problem``, says everything else:

- reading: what a label in a data file may be and what the dataset stores for it; whether rows have one class
  (splits stratified by it, classes checked);
- collation: the dtype of ``labels`` in a batch;
- the head: its module, its width, its loss and what one prediction is;
- scores: the metrics it offers, the default ones, and its headline metric: the higher-is-better number that
  stands for the task where one number is wanted (``val/avg/score``, which the configs' checkpoints monitor);
- writing: a prediction file's row and the server's answer;
- rows per example: whether an example becomes several rows (the windows of a tagger's sentence or of a QA context,
  or a multiple-choice question's choices), each carrying its ``example``; predictions, metrics and the sampler's
  weights then join an example's rows again (a question's choices also share every batch).

Adding a kind is one file with a `TaskKind` subclass and one entry in `KINDS`.
"""

from __future__ import annotations

from mtl.errors import MTLConfigError
from mtl.kinds.base import TaskKind
from mtl.kinds.classification import Classification
from mtl.kinds.extractive_qa import ExtractiveQA
from mtl.kinds.multilabel import Multilabel
from mtl.kinds.multiple_choice import MultipleChoice
from mtl.kinds.regression import Regression
from mtl.kinds.token_classification import TokenClassification

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), Multilabel(), Regression(),
                                                           TokenClassification(), ExtractiveQA(), MultipleChoice())}
PROBLEMS = tuple(KINDS)


def kind_of(problem: str) -> TaskKind:
    """The kind a task spec's ``problem`` names."""
    kind = KINDS.get(problem)
    if kind is None:
        raise MTLConfigError(f"problem '{problem}' is unknown, expected one of {list(PROBLEMS)}")
    return kind
