"""diffopt compare: a grid x seeds on the same tasks, a report recomputable from results.json,
plots, resumption, grid files, TensorBoard, and the pre-trained baseline."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_episode
from PIL import Image

import diffopt.compare.runs as compare_module
from diffopt.cli import main
from diffopt.compare import (
    aggregate,
    compare,
    format_table,
    load_grid_file,
    product_configs,
)
from diffopt.config import resolve_config
from diffopt.errors import DiffoptError
from diffopt.evaluate import EvaluationProtocol
from diffopt.gradcheck import check_meta_gradient

PROTOCOL = EvaluationProtocol(tasks=6, steps=(0, 1), test_shots=10)
GRID = dict(dataset="sinusoid", configs={"maml": {"hidden": [8]}, "pretrain": {"algorithm": "pretrain",
                                                                            "hidden": [8]}},
            shots=(3,), seeds=(0, 1), iterations=4, protocol=PROTOCOL, progress=False)


def assert_real_png(path) -> None:
    with Image.open(path) as image:
        assert image.size[0] >= 600 and image.size[1] >= 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 20  # drawn, not blank


@pytest.fixture(scope="module")
def sinusoid_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rows = compare(**GRID, out=out)
    return out, rows


@pytest.mark.slow
def test_every_run_is_scored_on_the_same_tasks(sinusoid_grid):
    out, _ = sinusoid_grid
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["label"], r["seed"]) for r in runs] == [("maml", 0), ("maml", 1), ("pretrain", 0),
                                                        ("pretrain", 1)]
    keys = {tuple(r["task_keys"]) for r in runs}
    assert len(keys) == 1 and len(next(iter(keys))) == 6 and len(set(next(iter(keys)))) == 6
    # seeds differ (initialisation and task stream), so their scores do
    assert runs[0]["scores"]["0"] != runs[1]["scores"]["0"]


@pytest.mark.slow
def test_the_report_is_recomputed_from_results_json(sinusoid_grid):
    out, rows = sinusoid_grid
    results = json.loads((out / "results.json").read_text())
    recomputed = aggregate(results["runs"])
    assert recomputed == rows
    report = (out / "report.md").read_text()
    assert format_table(recomputed, "mse", [0, 1]) in report
    for row in recomputed:  # the numbers, from the per-task scores by hand
        members = [r for r in results["runs"] if r["label"] == row.label]
        for step in (0, 1):
            seed_means = [np.mean(r["scores"][str(step)]) for r in members]
            assert row.mean[step] == pytest.approx(np.mean(seed_means))
            t = math.tan(math.pi * 0.475)  # Student t quantile 0.975 with 1 degree of freedom
            assert row.ci95_seeds[step] == pytest.approx(t * np.std(seed_means, ddof=1) / math.sqrt(2))
            per_task = np.mean([r["scores"][str(step)] for r in members], 0)
            assert row.ci95_tasks[step] == pytest.approx(1.96 * per_task.std(ddof=1) / math.sqrt(6))
        assert row.meta_parameters == sum(p.numel() for p in torch.nn.Linear(1, 8).parameters()) + 9
        assert row.iterations == 4 and 0 <= row.step_memory_mb < 500
    assert results["versions"].startswith("Python ") and "torch " in results["versions"]


@pytest.mark.slow
def test_the_plots_are_real_images(sinusoid_grid):
    out, _ = sinusoid_grid
    report = (out / "report.md").read_text()
    for name in ("learning_curves.png", "final_scores.png", "sinusoid_fits.png"):
        assert_real_png(out / name)
        assert f"]({name})" in report
    validation = (out / "runs" / "maml-k3-seed0" / "validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in validation] == [0, 1, 2, 3, 4]


def test_the_plotted_sinusoid_is_the_tasks_function():
    from diffopt.plots import sinusoid_task

    x, y, truth = sinusoid_task(seed=2017, shots=5)
    np.testing.assert_allclose(truth(x), y, rtol=0, atol=1e-9)
    assert x.shape == (5, 1)


@pytest.mark.slow
def test_finished_runs_are_reused_and_interrupted_ones_resumed(sinusoid_grid, tmp_path, monkeypatch):
    source, rows = sinusoid_grid
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    lost = out / "runs" / "pretrain-k3-seed1"
    (lost / "evaluation.json").unlink()  # as if killed during evaluation
    metrics = (lost / "metrics.jsonl").read_text()
    ran = []
    real = compare_module._run_in_subprocess
    monkeypatch.setattr(compare_module, "_run_in_subprocess",
                        lambda config, *a: ran.append(config.run_dir) or real(config, *a))
    again = compare(**GRID, out=out)
    assert ran == [str(lost)]
    assert (lost / "metrics.jsonl").read_text() == metrics  # resumed from its checkpoint, not retrained
    assert [(r.label, r.mean) for r in again] == [(r.label, r.mean) for r in rows]
    record = json.loads((lost / "evaluation.json").read_text())
    config = resolve_config(**record["config"])
    assert compare_module._finished(lost, config, PROTOCOL) is not None
    assert compare_module._finished(lost, config, EvaluationProtocol(7, (0, 1), 10)) is None  # another one
    non_transductive = replace(PROTOCOL, transductive=False)
    assert compare_module._finished(lost, config, non_transductive) is None  # another protocol
    older = {k: v for k, v in record["protocol"].items() if k not in ("rotations", "ensemble")}
    old_record = {**record, "protocol": older}
    (lost / "evaluation.json").write_text(json.dumps(old_record))  # written before the settings existed
    assert compare_module._finished(lost, config, PROTOCOL) is not None
    assert compare_module._finished(lost, replace(config, inner_lr=0.5), PROTOCOL) is None


def test_grid_file_and_command_line(tmp_path, capsys, compare_in_process):
    grid = tmp_path / "grid.yaml"
    grid.write_text("dataset: sinusoid\nshots: [2]\nseeds: 1\niterations: 2\neval_tasks: 3\n"
                    "eval_steps: [1]\nconfigs:\n  plain: {hidden: [4]}\n"
                    "  learned: {inner_optimizer: lslr, hidden: [4]}\n")
    out = tmp_path / "out"
    assert main(["compare", "--config", str(grid), "--out", str(out), "--progress", "False"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["plain", "learned"]
    assert results["configs"]["learned"] == {"inner_optimizer": "lslr", "hidden": [4]}
    assert results["command"].startswith("diffopt compare --config")
    assert "| plain | 2 | 1 |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text('{"configs": {"a": {}}, "sheds": 3}')
    assert main(["compare", "--config", str(tmp_path / "bad.json")]) == 2
    assert "unknown key 'sheds'" in capsys.readouterr().err


def test_train_options_on_the_command_line_and_in_common_apply_to_every_configuration(
        tmp_path, capsys, compare_in_process):
    grid = tmp_path / "grid.yaml"
    grid.write_text("shots: [2]\niterations: 2\neval_tasks: 3\neval_steps: [1]\n"
                    "common: {hidden: [4], inner_lr: 0.05}\n"
                    "configs:\n  plain: {}\n  bigger_step: {inner_lr: 0.2}\n")
    out = tmp_path / "out"
    assert main(["compare", "--config", str(grid), "--meta_batch_size", "3", "--out", str(out),
                 "--progress", "False"]) == 0, capsys.readouterr().err
    resolved = {run.name: json.loads((run / "config.json").read_text())
                for run in sorted((out / "runs").iterdir())}
    assert {name: (c["meta_batch_size"], c["hidden"], c["inner_lr"]) for name, c in resolved.items()} == {
        "plain-k2-seed0": (3, [4], 0.05), "bigger_step-k2-seed0": (3, [4], 0.2)}
    report = (out / "report.md").read_text()
    assert "| setting | plain | bigger_step |\n|---|---|---|\n| inner_lr | 0.05 | 0.2 |\n\n" in report
    assert "across seeds" not in report  # one seed: intervals are across tasks only
    capsys.readouterr()
    assert main(["compare", "--config", str(grid), "--inner_lr", "0.1", "--out", str(tmp_path / "x")]) == 2
    assert "--inner_lr is set for every configuration and by configuration 'bigger_step' too" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_typo_inside_a_grid_file_names_the_file_the_entry_and_the_closest_key(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("configs:\n  plain: {}\n  fast: {inner_lrr: 0.2}\n")
    with pytest.raises(DiffoptError, match=r"unknown train option 'inner_lrr' in .*grid.yaml, "
                                           r"configs.fast; did you mean inner_lr\?"):
        load_grid_file(grid)
    grid.write_text("common: {meta_batch_sise: 2}\nconfigs:\n  plain: {}\n")
    with pytest.raises(DiffoptError, match=r"in .*grid.yaml, common; did you mean meta_batch_size\?"):
        load_grid_file(grid)


def test_product_of_algorithms_rules_and_steps_skips_what_is_undefined():
    configs = product_configs(["maml", "fomaml"], ["sgd", "lslr"], [1, 5])
    assert list(configs) == ["maml+sgd+1steps", "maml+sgd+5steps", "maml+lslr+1steps",
                             "maml+lslr+5steps", "fomaml+sgd+1steps", "fomaml+sgd+5steps"]
    assert configs["maml+lslr+5steps"] == {"algorithm": "maml", "inner_optimizer": "lslr",
                                           "inner_steps": 5}
    assert list(product_configs(["maml", "reptile"])) == ["maml", "reptile"]


def test_bad_grid_files_are_one_line_errors(tmp_path):
    with pytest.raises(DiffoptError, match="no grid file"):
        load_grid_file(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- maml\n")
    with pytest.raises(DiffoptError, match="must hold a mapping"):
        load_grid_file(tmp_path / "list.yaml")
    (tmp_path / "configs.yaml").write_text("configs: [maml]\n")
    with pytest.raises(DiffoptError, match="must map labels to train options"):
        load_grid_file(tmp_path / "configs.yaml")


def test_tensorboard_event_files(tmp_path, compare_in_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    compare(**{**GRID, "seeds": (0,), "configs": {"maml": {"hidden": [8]}}}, out=tmp_path,
            tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "maml-k3-seed0"))
    events.Reload()
    validation = [e.value for e in events.Scalars("validation/mse")]
    recorded = [json.loads(x)["mse"] for x in
                (tmp_path / "runs" / "maml-k3-seed0" / "validation.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(validation, recorded, rtol=1e-6)
    assert len(events.Scalars("train/loss")) == 4


def test_pretrain_meta_gradient_is_the_joint_loss_gradient():
    from diffopt.algorithms import Pretrain
    from diffopt.inner import InnerLoop
    from diffopt.models import MLP

    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(6,), activation="tanh").double()
    learner = Pretrain(model, InnerLoop("sgd", 0.1, 2), torch.nn.functional.mse_loss)
    episode = random_episode(seed=3, tasks=3, shots=4, queries=5)
    assert check_meta_gradient(learner, episode).max_rel_error < 1e-6
    # fine-tuning at evaluation is the ordinary inner loop on the support set
    task = next(iter(episode))
    adapted = learner.adapt(task.support_x, task.support_y)
    before = torch.nn.functional.mse_loss(model(task.support_x), task.support_y)
    after = torch.nn.functional.mse_loss(adapted(task.support_x), task.support_y)
    assert after < before


@pytest.mark.slow
def test_omniglot_grid_on_the_shared_data(omniglot_root, tmp_path):
    rows = compare(dataset="omniglot", configs={"maml": {"data_root": str(omniglot_root)},
                                                "fomaml": {"algorithm": "fomaml",
                                                           "data_root": str(omniglot_root)}},
                   shots=(1,), seeds=(0, 1), iterations=2, protocol=EvaluationProtocol(4, (0, 1), 2),
                   validate_every=1, validation_tasks=2,
                   out=tmp_path, progress=False, **{"ways": 3})
    results = json.loads((tmp_path / "results.json").read_text())
    assert len({tuple(r["task_keys"]) for r in results["runs"]}) == 1
    assert aggregate(results["runs"]) == rows
    assert format_table(rows, "accuracy", [0, 1]) in (tmp_path / "report.md").read_text()
    for run in results["runs"]:
        assert all(abs(s * 6 - round(s * 6)) < 1e-5 for s in run["scores"]["1"])  # 3 ways x 2 queries
    for name in ("learning_curves.png", "final_scores.png"):
        assert_real_png(tmp_path / name)


def test_diverging_scores_are_counted_not_averaged():
    runs = [{"label": "rule", "shots": 5, "seed": seed, "scores": {"1": [0.5, 0.7], "10": [0.4, bad]},
             "task_keys": ["a", "b"], "iterations": 3, "seconds_per_iteration": 0.1,
             "step_memory_mb": 1.0, "meta_parameters": 9, "train_seconds": 1.0}
            for seed, bad in [(0, math.inf), (1, 0.3)]]
    (row,) = aggregate(runs)
    assert row.diverged == {1: 0, 10: 1} and row.scored == 4
    table = format_table([row], "mse", [1, 10])
    assert "diverges on 1 of 4 (seed, task) pairs" in table and "0.600 +- 0.000" in table


def test_a_wall_clock_budget_is_the_same_for_every_configuration(tmp_path, compare_in_process, step_clock):
    """Each meta-step takes 0.2 s of training clock (``step_clock``): every configuration stops
    at its first meta-iteration past the 0.5 s budget, the third."""
    step_clock(0.2)
    compare(**{**GRID, "seeds": (0,), "iterations": 100}, max_seconds=0.5, out=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["budget"]["max_seconds"] == 0.5
    for run in results["runs"]:
        records = [json.loads(line) for line in (tmp_path / "runs" / run["run"] / "metrics.jsonl").open()]
        clocks = [0.0] + [r["train_seconds"] for r in records]  # the clock before each, and at the end
        assert run["train_seconds"] == clocks[-1] >= 0.5 > clocks[-2], clocks
        assert run["iterations"] == len(records) == 3
    assert "0.5 s of training time per run" in (tmp_path / "report.md").read_text()


def test_curve_legends_say_after_how_many_inner_steps_where_lines_differ():
    from diffopt.plots import curve_labels

    record = lambda steps: [[{"steps": steps, "iteration": 0, "train_seconds": 0.0}]]  # noqa: E731
    labels, axis = curve_labels({"maml K=5": record(1), "reptile K=5": record(50)})
    assert labels == {"maml K=5": "maml K=5 (after 1 inner step)",
                      "reptile K=5": "reptile K=5 (after 50 inner steps)"}
    assert axis == "after the inner steps in each legend"
    labels, axis = curve_labels({"maml K=5": record(10), "fomaml K=5": record(10)})
    assert labels == {"maml K=5": "maml K=5", "fomaml K=5": "fomaml K=5"} and axis == "after 10 inner steps"


def test_a_non_transductive_comparison_says_so_and_scores_each_query_alone(
        tmp_path, monkeypatch, compare_in_process):
    evaluate_module = importlib.import_module("diffopt.evaluate")  # the package exports the function

    calls = []
    real = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))
    protocol = EvaluationProtocol(tasks=4, steps=(0, 1), test_shots=5, transductive=False)
    config = resolve_config(dataset="sinusoid", hidden=[8], iterations=2, run_dir=str(tmp_path / "one"))
    record = compare_module.run_one(config, protocol)  # what each comparison's process runs
    assert [k["transductive"] for k in calls] == [False] and record["protocol"]["transductive"] is False
    assert record["protocol"] == protocol.record(config, iteration=2)  # diffopt evaluate's schema
    assert record["protocol"]["split"] == "test" and record["protocol"]["shots"] == config.shots
    assert EvaluationProtocol.from_record(record["protocol"]) == protocol
    compare(**{**GRID, "seeds": (0,), "iterations": 2, "protocol": protocol}, out=tmp_path / "grid")
    tmp_path = tmp_path / "grid"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["evaluation"]["transductive"] is False
    assert "non-transductive: each query example scored with the support set alone" in (
        tmp_path / "report.md").read_text()


def test_compare_command_line_rejects_a_non_boolean_eval_transductive(tmp_path, capsys):
    command = ["compare", "--algorithms", "maml", "--eval_transductive", "3", "--out", str(tmp_path / "c")]
    assert main(command) == 2
    assert "--eval_transductive must be True or False" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_train_option_one_letter_from_a_compare_option_is_named(tmp_path, capsys):
    assert main(["compare", "--algorithm", "maml,reptile", "--out", str(tmp_path / "c")]) == 2
    assert "did you mean compare's --algorithms?" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_grid_file_with_configs_refuses_the_keys_it_would_ignore(tmp_path):
    from diffopt.compare import load_grid_file
    from diffopt.errors import DiffoptError

    grid = tmp_path / "grid.yaml"
    grid.write_text("dataset: sinusoid\ninner_steps: [5, 25]\nconfigs:\n  plain: {algorithm: maml}\n")
    with pytest.raises(DiffoptError, match="'inner_steps' would replace: set it inside each configuration"):
        load_grid_file(grid)
    assert set(load_grid_file("examples/checkpoint_grid.yaml")["configs"]) == {
        "plain-5steps", "checkpointed-5steps", "plain-25steps", "checkpointed-25steps"}


def test_a_runs_warnings_reach_the_console_and_the_report_beside_its_row(tmp_path, capsys,
                                                                          compare_in_process):
    out = tmp_path / "out"  # gradient steps leave iMAML's proximal problem unsolved: it warns
    assert main(["compare", "--algorithms", "imaml,maml", "--inner_solver", "gradient", "--inner_backtrack",
                 "False", "--inner_lr", "0.01", "--inner_proximal", "1", "--shots", "2", "--iterations", "2",
                 "--eval_tasks", "3", "--eval_steps", "1",
                 "--hidden", "4", "--out", str(out), "--progress", "False"]) == 0
    printed = capsys.readouterr().out
    assert "| imaml (warned) | 2 | 1 |" in printed and "| maml | 2 | 1 |" in printed
    assert "warning: imaml K=2: imaml's inner steps leave the proximal problem far from solved" in printed
    report = (out / "report.md").read_text()
    assert "| imaml (warned) |" in report
    assert "- imaml K=2: imaml's inner steps leave the proximal problem far from solved" in report
    record = json.loads((out / "runs" / "maml-k2-seed0" / "evaluation.json").read_text())
    assert record["result"]["warnings"] == []


def test_learning_curves_draw_a_run_that_diverged_from_its_first_validation(tmp_path):
    from diffopt.plots import validation_curves

    def records(values):
        return [{"iteration": i, "train_seconds": float(i), "steps": 1, "mse": v, "ci95": 0.0}
                for i, v in enumerate(values)]

    groups = {"diverged": [records([math.inf, math.inf, math.nan])], "fine": [records([2.0, 1.0, 0.5])]}
    path = validation_curves(groups, "mse", tmp_path / "curves.png", title="t", lower_is_better=True)
    assert path.stat().st_size > 0
    only_diverged = {"diverged": groups["diverged"]}
    assert validation_curves(only_diverged, "mse", tmp_path / "alone.png", title="t", lower_is_better=True)


@pytest.mark.parametrize("seeds, said", [((0,), "95% interval across tasks (one seed)"),
                                         ((0, 1), "95% interval across seeds")])
def test_the_final_scores_figure_names_the_interval_it_draws(seeds, said, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from diffopt.plots import final_scores

    runs = [{"label": "maml", "shots": 5, "seed": seed, "scores": {"1": [1.0, 2.0, 3.0]},
             "task_keys": ["a"] * 3, "iterations": 2, "seconds_per_iteration": 0.1, "meta_parameters": 3,
             "train_seconds": 1.0} for seed in seeds]
    titles = []
    real = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle",
                        lambda fig, text, **k: titles.append(text) or real(fig, text, **k))
    results = {"dataset": "sinusoid", "metric": "mse", "seeds": list(seeds), "evaluation": {"steps": [1]}}
    final_scores(results, aggregate(runs), tmp_path / "f.png")
    assert titles == [f"sinusoid: held-out mse, {said}"]
