"""Several processes under torchrun (gloo on this CPU): the same run as one process, a dead rank
ends the run instead of hanging, resume, sharded evaluation, the meta-batch check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_episode

from diffopt import distributed
from diffopt.cli import main
from diffopt.errors import DiffoptError
from diffopt.runfolder import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--meta_batch_size", "8", "--shots", "5", "--hidden", "8,8", "--progress", "False"]
MAML = ["--iterations", "3", "--inner_optimizer", "lslr", "--validate_every", "2",
        "--validation_tasks", "5", *SMALL]
REPTILE = ["--algorithm", "reptile", "--iterations", "3", "--inner_steps", "2", *SMALL]
RUN_FOLDER = {"checkpoint.pt", "config.json", "metrics.jsonl", "validation.jsonl"}

DYING = """\
import os, sys
import diffopt.distributed as distributed
from diffopt.cli import main
calls, reduce = 0, distributed.all_reduce_grads
def dying(module):  # rank 1 dies in meta-iteration DIE_AT, before its gradients are averaged
    global calls
    calls += 1
    if calls == int(os.environ["DIE_AT"]) and os.environ["RANK"] == "1":
        os._exit(1)
    reduce(module)
distributed.all_reduce_grads = dying
sys.exit(main(sys.argv[1:]))
"""


def environment(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "DIFFOPT_DIST_TIMEOUT": "30", **extra}


def torchrun(*command: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 COMMAND`` on this machine; COMMAND: ``-m diffopt ...``, a
    script, or ``--no-python`` and a program."""
    return subprocess.run([*distributed.local_launcher(2), *command], env=environment(**env),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path) -> None:
    """Two run folders hold the same parameters (float tolerance), losses and validations."""
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a["iteration"] == b["iteration"]
    assert a["algorithm"].keys() == b["algorithm"].keys()
    for name, tensor in a["algorithm"].items():
        torch.testing.assert_close(b["algorithm"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    validations = [[json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
                   for run in (one, two)]
    assert [v["iteration"] for v in validations[1]] == [v["iteration"] for v in validations[0]]
    assert [v["mse"] for v in validations[1]] == pytest.approx([v["mse"] for v in validations[0]], rel=1e-5)


def console_script() -> list[str]:
    """The ``diffopt`` console script beside this Python (torchrun --no-python), else ``-m diffopt``."""
    script = Path(sys.executable).parent / "diffopt"
    return ["--no-python", str(script)] if script.is_file() else ["-m", "diffopt"]


@pytest.mark.slow
@pytest.mark.parametrize("options, launch", [(MAML, ["-m", "diffopt"]), (REPTILE, console_script())],
                         ids=["maml-lslr", "reptile"])
def test_two_processes_train_as_one(tmp_path, options, launch):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *options, "--run_dir", str(one)]) == 0
    done = torchrun(*launch, "train", *options, "--run_dir", str(two))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("run folder:") == 1  # rank 0 alone prints
    assert {p.name for p in two.iterdir()} == RUN_FOLDER  # and writes
    assert len(losses(two)) == 3
    assert_same_run(one, two)


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_and_resume_finishes_it(tmp_path):
    """Rank 1 dies in iteration 3 (after the checkpoint of iteration 2): the other rank does not
    wait for it (its collective timeout is an hour here, longer than the test's guard, so a run
    that ends at all did not hang on the dead peer) and torchrun fails; resumed under torchrun,
    the run ends as one process's run."""
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    options = [*MAML, "--iterations", "4", "--checkpoint_every", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    died = torchrun(str(script), "train", *options, "--run_dir", str(two), DIE_AT="3", timeout=300,
                    DIFFOPT_DIST_TIMEOUT="3600")
    assert died.returncode != 0
    assert load_checkpoint(two)["iteration"] == 2
    resumed = torchrun("-m", "diffopt", "train", "--resume", str(two), "--progress", "False")
    assert resumed.returncode == 0, resumed.stderr
    assert main(["train", *options, "--run_dir", str(one)]) == 0
    assert_same_run(one, two)


@pytest.mark.slow
def test_the_survivor_of_a_dead_peer_reports_it_in_one_line(tmp_path):
    """Without torchrun to stop it, rank 0's collective fails (or times out) with a clear error."""
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    rendezvous = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(distributed.free_port()),
                      DIE_AT="2", DIFFOPT_DIST_TIMEOUT="20")
    command = [sys.executable, str(script), "train", *MAML, "--run_dir", str(tmp_path / "run")]
    ranks = [subprocess.Popen(command, env=environment(**rendezvous, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for r in (0, 1)]
    assert ranks[1].wait(timeout=60) == 1
    assert ranks[0].wait(timeout=45) == 2
    error = ranks[0].stderr.read().strip().splitlines()
    assert error[-1].startswith("diffopt: error: rank 0 of 2: averaging the meta-gradient failed: "
                                "another process died or did not answer within DIFFOPT_DIST_TIMEOUT=20 s")


@pytest.mark.slow
def test_sharded_evaluation_scores_the_same_tasks_in_order(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--iterations", "1", *SMALL, "--run_dir", str(run)]) == 0
    evaluation = ["evaluate", str(run), "--tasks", "31", "--steps", "0,1"]  # batches of 25 and 6
    assert main(evaluation) == 0
    (scores,) = run.glob("eval-k5-trans-*.json")
    alone = json.loads(scores.read_text())
    scores.unlink()
    done = torchrun("-m", "diffopt", *evaluation)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("mse after   1 step:") == 1
    sharded = json.loads(scores.read_text())
    assert sharded["summary"].keys() == alone["summary"].keys()
    for step, values in alone["scores"].items():
        assert len(values) == 31
        assert sharded["scores"][step] == pytest.approx(values, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_torchrun_refuses_a_meta_batch_it_cannot_split(tmp_path):
    done = torchrun("-m", "diffopt", "train", "--meta_batch_size", "5", "--run_dir", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "diffopt: error: --meta_batch_size 5 does not split evenly over 2 processes" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_meta_batch_that_does_not_split_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    assert main(["train", "--meta_batch_size", "5", "--run_dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("diffopt: error: --meta_batch_size 5 does not split evenly "
                                       "over 2 processes; give a multiple of 2\n")
    assert not (tmp_path / "run").exists()


def test_shards_are_contiguous_and_cover_the_meta_batch(monkeypatch):
    episode = random_episode(0, tasks=7)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shards = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(distributed.shard(episode))
    assert [len(s) for s in shards] == [2, 2, 3]
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(torch.cat([getattr(s, name) for s in shards]), getattr(episode, name))


def test_a_single_process_is_left_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init("cpu")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    episode = random_episode(0, tasks=3)
    assert distributed.shard(episode) is episode
    assert distributed.gather_shards(["a", "b"]) == [["a"], ["b"]]
    assert distributed.mean_over_ranks({"loss": 1.5}) == {"loss": 1.5}


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_the_timeout_must_be_positive_seconds(monkeypatch, value):
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, value)
    with pytest.raises(DiffoptError, match="DIFFOPT_DIST_TIMEOUT must be a number of seconds > 0"):
        distributed.timeout_seconds()
