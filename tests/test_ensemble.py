"""MAML++'s test protocol: keep the checkpoints of the best validations (``--keep_best``) and score
the ensemble of their adapted models, predictions averaged (``diffopt evaluate --ensemble``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import small_algorithm

from diffopt.cli import main
from diffopt.data import Episode, get_dataset
from diffopt.errors import DiffoptError
from diffopt.evaluate import EVAL_SEED, evaluate
from diffopt.runfolder import BEST_FOLDER, best_checkpoints, keep_if_best


def test_keep_if_best_keeps_the_k_best_and_drops_the_rest(tmp_path):
    saved = []

    def save(path):
        path.write_text("x")
        saved.append(int(path.stem))

    for iteration, score in [(0, 0.2), (10, 0.5), (20, 0.4), (30, 0.1), (40, 0.7), (50, 0.45)]:
        keep_if_best(tmp_path, iteration, score, 3, False, save)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [entry["iteration"] for entry in index] == [40, 10, 50]  # best first
    assert sorted(int(p.stem) for p in tmp_path.glob("*.pt")) == [10, 40, 50]
    assert 30 not in saved  # never among the best: never written
    keep_if_best(tmp_path / "mse", 0, 2.0, 1, True, save)
    keep_if_best(tmp_path / "mse", 5, 1.0, 1, True, save)  # lower is better
    assert [p.stem for p in (tmp_path / "mse").glob("*.pt")] == ["00000005"]


@pytest.mark.parametrize("vectorize", ["never", "always"])
def test_an_ensemble_averages_its_members_predictions(vectorize):
    spec = get_dataset("sinusoid")
    members = [small_algorithm(seed=seed, vectorize=vectorize) for seed in (0, 1)]
    result = evaluate(members, spec, shots=5, test_shots=10, tasks=4, steps=(0, 1), batch_size=4)
    batch = next(iter(spec.loader("test", seed=EVAL_SEED, shots=5, test_shots=10, batch_size=4, num_tasks=4)))
    episode = Episode.from_torchmeta(batch, dtype=torch.float64)
    for index, task in enumerate(episode):
        predictions = []
        for member in members:
            unrolled = list(member.unroll(task.support_x, task.support_y, steps=1))
            predictions.append(unrolled[1](task.query_x).detach())
        expected = spec.score(torch.stack(predictions).mean(0)[None], task.query_y[None])
        assert result.scores[1][index] == pytest.approx(float(expected), rel=1e-9)
    single = evaluate(members[:1], spec, shots=5, test_shots=10, tasks=4, steps=(1,), batch_size=4)
    assert np.allclose(single.scores[1], evaluate(members[0], spec, shots=5, test_shots=10, tasks=4,
                                                  steps=(1,), batch_size=4).scores[1])
    assert not np.allclose(single.scores[1], result.scores[1])


def test_keep_best_then_evaluate_the_ensemble(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--iterations", "6", "--meta_batch_size", "2", "--hidden", "8",
                 "--validate_every", "2", "--validation_tasks", "4", "--keep_best", "2",
                 "--progress", "False", "--run_dir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    best = sorted(records, key=lambda r: r["mse"])[:2]
    assert [p.name for p in best_checkpoints(run, 2)] == [f"{r['iteration']:08d}.pt" for r in best]
    assert len(list((run / BEST_FOLDER).glob("*.pt"))) == 2
    assert main(["evaluate", str(run), "--tasks", "4", "--steps", "1", "--ensemble", "2"]) == 0
    (written,) = run.glob("eval-k10-trans-*.json")
    saved = json.loads(written.read_text())
    assert saved["protocol"]["ensemble"] == 2 and len(saved["scores"]["1"]) == 4
    assert main(["evaluate", str(run), "--tasks", "4", "--ensemble", "3"]) == 2
    assert "kept 2 best checkpoints; --ensemble 3 needs" in capsys.readouterr().err
    with pytest.raises(DiffoptError, match="--keep_best keeps the best validations' checkpoints"):
        from diffopt.config import resolve_config

        resolve_config(keep_best=5)
