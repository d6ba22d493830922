"""The pipeline: task streams, evaluation statistics, training that learns, and the comparison."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from diffopt.config import resolve_config
from diffopt.data import Episode, get_dataset, split_seed
from diffopt.evaluate import evaluate, mean_ci95
from diffopt.train import build, outer_step, train

SINUSOID = get_dataset("sinusoid")


def first_batch(split: str, seed: int, shots: int = 5):
    loader = SINUSOID.loader(split, seed=seed, shots=shots, test_shots=5, batch_size=4, num_tasks=8)
    return Episode.from_torchmeta(next(iter(loader)))


def test_task_stream_depends_on_seed_and_split_only():
    a, b = first_batch("test", 3), first_batch("test", 3)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, first_batch("test", 4).support_x)
    assert not torch.equal(a.support_x, first_batch("train", 3).support_x)
    assert len({split_seed(0, s) for s in ("train", "val", "test")}) == 3


def test_sinusoid_tasks_have_the_published_ranges():
    loader = SINUSOID.loader("train", seed=0, shots=50, test_shots=50, batch_size=100, num_tasks=100)
    dataset = loader.dataset  # ClassSplitter sets itself as the Sinusoid's dataset_transform
    episode = Episode.from_torchmeta(next(iter(loader)), dtype=torch.float64)
    x = torch.cat([episode.support_x, episode.query_x], 1)
    y = torch.cat([episode.support_y, episode.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    amplitudes, phases = dataset.amplitudes[:100], dataset.phases[:100]
    assert amplitudes.min() >= 0.1 and amplitudes.max() <= 5 and phases.min() >= 0 and phases.max() <= np.pi
    amplitudes, phases = (torch.as_tensor(a)[:, None, None] for a in (amplitudes, phases))
    expected = amplitudes * torch.sin(x - phases)
    torch.testing.assert_close(y, expected)


def test_mean_ci95():
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 3.0, size=400)
    mean, ci = mean_ci95(values)
    assert mean == pytest.approx(values.mean())
    assert ci == pytest.approx(1.96 * values.std(ddof=1) / math.sqrt(400))
    assert math.isnan(mean_ci95([1.0])[1])


def test_evaluation_scores_the_query_set_after_each_step():
    config = resolve_config(hidden=(8,), shots=5)
    algorithm = build(config)
    evaluation = evaluate(algorithm, SINUSOID, shots=5, test_shots=20, tasks=6, steps=(0, 3), seed=1)
    loader = SINUSOID.loader("test", seed=1, shots=5, test_shots=20, batch_size=25, num_tasks=6)
    episode = Episode.from_torchmeta(next(iter(loader)))
    with torch.no_grad():
        before = ((algorithm.model(episode.query_x) - episode.query_y) ** 2).mean((1, 2))
    np.testing.assert_allclose(evaluation.scores[0], before.numpy(), rtol=1e-6)
    assert evaluation.scores[3].shape == (6,)
    assert not np.allclose(evaluation.scores[3], evaluation.scores[0])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_meta_training_improves_post_adaptation_mse(algorithm, tmp_path):
    config = resolve_config(algorithm=algorithm, shots=10, iterations=150, seed=0,
                            run_dir=str(tmp_path / algorithm), progress=False)
    untrained = build(config)
    trained = train(config).algorithm
    kwargs = dict(shots=10, test_shots=50, tasks=50, steps=(1,), seed=5)
    before = evaluate(untrained, SINUSOID, **kwargs).summary(1)[0]
    after = evaluate(trained, SINUSOID, **kwargs).summary(1)[0]
    assert after < 0.9 * before, (before, after)


def test_reptile_outer_step_is_annealed_linearly(tmp_path):
    config = resolve_config(algorithm="reptile", iterations=4, meta_batch_size=2, hidden=(4,),
                            run_dir=str(tmp_path / "r"), progress=False)
    assert (config.outer_optimizer, config.meta_lr, config.meta_lr_final) == ("sgd", 1.0, 0.0)
    train(config)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # the step size iteration t used: eps_t = 1 - (t - 1) / 4
    np.testing.assert_allclose(lrs, [1 - (t - 1) / 4 for t in range(1, 5)])


def test_each_iteration_logs_where_its_time_went(tmp_path, monkeypatch):
    import diffopt.train as train_module

    real = train_module.Episode.from_torchmeta

    def slow_episode(*args, **kwargs):  # a loader 20 ms slower than its meta-step
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module.Episode, "from_torchmeta", slow_episode)
    config = resolve_config(iterations=5, meta_batch_size=2, hidden=(4,), checkpoint_every=2,
                            run_dir=str(tmp_path / "r"), progress=False)
    train(config)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        parts = [record["data_seconds"], record["gradient_seconds"], record["outer_seconds"]]
        assert min(parts) > 0 and sum(parts) <= record["seconds"] * (1 + 1e-9)
        assert record["data_seconds"] >= 0.02  # the loader's time, not the step's


def test_time_budget_drives_the_schedule(tmp_path, step_clock):
    """A meta-step takes 0.25 s of the training clock (``step_clock``), so a 1 s budget is four
    iterations whatever the machine's speed."""
    step_clock(0.25)
    config = resolve_config(algorithm="reptile", iterations=100, meta_batch_size=2, hidden=(4,),
                            max_seconds=1.0, run_dir=str(tmp_path), progress=False)
    assert train(config).iterations == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_seconds"] for r in records] == [0.25, 0.5, 0.75, 1.0]
    clock_before = [0.0] + [r["train_seconds"] for r in records[:-1]]
    # eps = 1 -> 0 over the time budget, which runs out long before 100 iterations
    expected = [1 - max((r["iteration"] - 1) / 100, clock / 1.0)
                for r, clock in zip(records, clock_before, strict=True)]
    np.testing.assert_allclose(expected, [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose([r["lr"] for r in records], expected)


def test_snapshots_are_taken_at_multiples_of_the_training_clock(tmp_path, step_clock):
    """--snapshot_every_seconds 1 where each meta-step takes exactly 0.25 s of training time
    (``step_clock``): snapshots after iterations 4 and 8 (clock 1.0 and 2.0, a snapshot exactly
    on the boundary included), none after 10 (2.5), each the run's checkpoint at that iteration."""
    from diffopt.runfolder import load_checkpoint

    step_clock(0.25)
    config = resolve_config(iterations=10, meta_batch_size=2, hidden=(4,), snapshot_every_seconds=1.0,
                            run_dir=str(tmp_path / "run"), progress=False)
    train(config)
    snapshots = sorted((tmp_path / "run" / "snapshots").iterdir())
    assert [p.name for p in snapshots] == ["00000004.pt", "00000008.pt"]
    for path, iteration in zip(snapshots, (4, 8), strict=True):
        payload = load_checkpoint(path)
        assert (payload["iteration"], payload["train_seconds"]) == (iteration, 0.25 * iteration)
    final = load_checkpoint(tmp_path / "run")
    assert (final["iteration"], final["train_seconds"]) == (10, 2.5)
    weights = [load_checkpoint(path)["algorithm"]["model.0.weight"] for path in snapshots]
    assert not torch.equal(weights[0], weights[1])  # each holds the weights of its own time
    assert not torch.equal(weights[1], final["algorithm"]["model.0.weight"])


def test_cosine_schedule_matches_torch():
    config = resolve_config(meta_lr=1e-3, meta_lr_final=1e-5, meta_lr_schedule="cosine", iterations=10)
    outer = outer_step(config)
    optimizer = outer.optimizer(build(config).parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-5)
    for t in range(11):
        assert outer.learning_rate(t / 10) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()


def test_validation_is_logged_and_leaves_training_untouched(tmp_path):
    common = dict(iterations=4, meta_batch_size=2, hidden=(8,), progress=False)
    plain = train(resolve_config(run_dir=str(tmp_path / "plain"), **common))
    config = resolve_config(run_dir=str(tmp_path / "val"), validate_every_seconds=1e-9,
                            validation_tasks=6, validation_steps=2, **common)
    validated = train(config)
    for a, b in zip(plain.algorithm.parameters(), validated.algorithm.parameters(), strict=True):
        assert torch.equal(a, b)  # validation consumes no training randomness
    records = [json.loads(line) for line in (tmp_path / "val" / "validation.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4]
    logged = [0.0] + [json.loads(line)["train_seconds"]
                      for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_seconds"] for r in records] == logged

    def score(algorithm, split):
        return evaluate(algorithm, SINUSOID, shots=config.shots, test_shots=SINUSOID.eval_test_shots,
                        tasks=6, steps=(2,), split=split).summary(2)

    assert (records[0]["mse"], records[0]["ci95"]) == pytest.approx(score(build(config), "val"))
    assert (records[-1]["mse"], records[-1]["ci95"]) == pytest.approx(score(validated.algorithm, "val"))
    assert records[-1]["mse"] != pytest.approx(score(validated.algorithm, "test")[0])


def test_validation_steps_default_to_the_training_steps():
    assert resolve_config(inner_steps=3).validation_steps == 3
    assert resolve_config(inner_steps=3, validation_steps=7).validation_steps == 7
    assert resolve_config(dataset="omniglot", algorithm="reptile").validation_steps == 50
