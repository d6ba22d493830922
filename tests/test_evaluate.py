"""Classification scoring against hand counts: ``accuracy_per_task`` on hand-made logits, and
``evaluate`` of one model and of an ensemble (logits averaged, MAML++'s protocol) on a hand-made
episode whose right answers are counted by hand. Square shapes (tasks = queries = classes = 3 in
places) make an axis mix-up compute a wrong number instead of failing on a shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffopt.algorithms import build_algorithm
from diffopt.config import resolve_config
from diffopt.data import Episode, accuracy_per_task, get_dataset
from diffopt.errors import DiffoptError
from diffopt.evaluate import EVAL_SEED, EvaluationProtocol, evaluate
from diffopt.inner import InnerLoop


def test_accuracy_per_task_is_the_hand_count():
    logits = torch.tensor([  # [tasks 3, queries 3, classes 3]
        [[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 3.0]],  # predicts 0, 1, 2
        [[0.0, 0.0, 1.0], [3.0, 1.0, 0.0], [0.0, 4.0, 2.0]],  # predicts 2, 0, 1
        [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [9.0, 0.0, 0.0]],  # predicts 2, 2, 0
    ])
    labels = torch.tensor([[0, 1, 0], [2, 2, 2], [0, 1, 2]])
    # right answers: task 0: queries 0 and 1; task 1: query 0; task 2: none
    assert accuracy_per_task(logits, labels).tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert accuracy_per_task(logits[0], labels[0]).item() == pytest.approx(2 / 3)  # one task: [N, C]
    wide = torch.zeros(1, 2, 5)  # 5 classes, 2 queries: the right class is 4 for both
    wide[0, :, 4] = 1.0
    assert accuracy_per_task(wide, torch.tensor([[4, 3]])).tolist() == [0.5]


QUERY_LOGITS = {  # member -> the logits it gives query j (the j-th one-hot input): [class scores]
    "a": [[4.0, 0.0, 3.0], [0.0, 1.0, 5.0], [2.0, 0.0, 0.0]],  # alone: classes 0, 2, 0
    "b": [[0.0, 4.0, 3.0], [0.0, 6.0, 0.0], [0.0, 3.0, 0.0]],  # alone: classes 1, 1, 1
}
# The mean logits: [2, 2, 3], [0, 3.5, 2.5], [1, 1.5, 0]: classes 2, 1, 1. Averaging softmax
# probabilities instead would give query 0 to class 0 (0.36, 0.36, 0.26), and a vote a tie.
LABELS = [[2, 1, 0], [0, 2, 1]]  # two tasks: the same three queries, other right answers
HAND = {  # per task, the right answers counted by hand
    ("a",): [1 / 3, 2 / 3],  # task 0: query 2; task 1: queries 0, 1
    ("b",): [1 / 3, 1 / 3],  # task 0: query 1; task 1: query 2
    ("a", "b"): [2 / 3, 1 / 3],  # task 0: queries 0, 1; task 1: query 2
}


def member(name: str, vectorize: str):
    """MAML on a bias-free linear model whose column j is the logits of query j; evaluated after
    0 inner steps, its predictions are exactly those logits."""
    model = nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(QUERY_LOGITS[name], dtype=torch.float64).T)
    return build_algorithm("maml", model, InnerLoop("sgd", 0.1, 1), F.cross_entropy, vectorize)


def hand_episode() -> Episode:
    one_hot = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    return Episode(one_hot, torch.tensor([[0, 1, 2]] * 2), one_hot.clone(), torch.tensor(LABELS))


@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("vectorize", ["never", "always"])
@pytest.mark.parametrize("members", list(HAND), ids=["+".join(m) for m in HAND])
def test_evaluate_scores_the_hand_count_and_an_ensemble_averages_logits(members, vectorize, transductive):
    algorithms = [member(name, vectorize) for name in members]
    result = evaluate(algorithms if len(algorithms) > 1 else algorithms[0], hand_episode(), steps=(0,),
                      transductive=transductive)
    assert result.metric == "accuracy"
    np.testing.assert_allclose(result.scores[0], HAND[members], rtol=0, atol=1e-12)


@pytest.mark.parametrize("given, prefix, message", [
    (dict(tasks=1), "", "--tasks must be a whole number >= 2"),
    (dict(steps=(0, -1)), "", "--steps must be >= 0"),
    (dict(steps=(1.5,)), "eval_", "--eval_steps must be >= 0"),
    (dict(test_shots=0), "eval_", "--eval_test_shots must be a whole number >= 1"),
    (dict(seed=-3), "eval_", "--eval_seed must be a whole number >= 0"),
    (dict(transductive="yes"), "eval_", "--eval_transductive must be True or False"),
    (dict(ensemble=0), "", "--ensemble must be a whole number >= 1"),
])
def test_an_evaluation_protocol_is_checked_where_it_is_built(given, prefix, message):
    with pytest.raises(DiffoptError, match=message):
        EvaluationProtocol(**given, option_prefix=prefix)


def test_an_evaluation_record_reads_back_as_its_protocol():
    protocol = EvaluationProtocol(tasks=7, steps=(10, 0, 10), seed=3, transductive=False)
    assert protocol.steps == (0, 10)  # sorted, once each: the order scores are kept in
    config = resolve_config(dataset="omniglot", shots=1)
    record = protocol.record(config, iteration=12)
    assert (record["iteration"], record["shots"], record["ways"], record["test_shots"]) == (12, 1, 5, 15)
    assert record["images"] == config.images and record["split"] == "test"
    assert EvaluationProtocol.from_record(record) == protocol.for_dataset(get_dataset(config.dataset))
    assert EvaluationProtocol.from_record(record) != protocol  # test_shots: the dataset's 15, not None
    older = {k: v for k, v in record.items() if k not in ("rotations", "ensemble")}
    assert EvaluationProtocol.from_record(older) == EvaluationProtocol.from_record(record)
    assert EvaluationProtocol().seed == EVAL_SEED

