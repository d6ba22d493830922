"""The inner optimizer's state across tasks (``--inner_state``): supervised-reptile carries its
Adam moments and step count from one meta-training task to the next and restores the full state
around each evaluation task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode, small_algorithm

from diffopt.algorithms import build_algorithm
from diffopt.checkpoint import save_checkpoint
from diffopt.config import resolve_config
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.runfolder import load_checkpoint
from diffopt.train import resume, train


def reptile(state: str, steps: int = 3, lr: float = 0.05):
    base = small_algorithm("reptile", seed=1)
    return build_algorithm("reptile", base.model, InnerLoop("adam", lr, steps, state=state), F.mse_loss)


def hand_adam_tasks(model, tasks, lr, steps, betas=(0.9, 0.999), eps=1e-8, state=None):
    """Each task's adapted weights, Adam written out (higher's formula: eps before the bias
    correction), its moments and step count carried from task to task, the weights not;
    ``state``: the per-tensor ``{'step', 'exp_avg', 'exp_avg_sq'}`` to start from (else zeros)."""
    initial = [p.detach().clone() for p in model.parameters()]
    if state is None:
        m = [torch.zeros_like(p) for p in initial]
        v = [torch.zeros_like(p) for p in initial]
        t = 0
    else:
        m = [s["exp_avg"].clone() for s in state]
        v = [s["exp_avg_sq"].clone() for s in state]
        (t,) = {s["step"] for s in state}
    adapted = []
    for x, y in tasks:
        weights = [p.clone().requires_grad_() for p in initial]
        for _ in range(steps):
            names = [n for n, _ in model.named_parameters()]
            out = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (x,))
            grads = torch.autograd.grad(F.mse_loss(out, y), weights)
            t += 1
            with torch.no_grad():
                for i, g in enumerate(grads):
                    m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                    v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
                    size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
                    weights[i] = (weights[i] - size * m[i] / (v[i].sqrt() + eps)).requires_grad_()
        adapted.append([w.detach() for w in weights])
    return adapted, t


@pytest.mark.parametrize("state", ["persist", "reset"])
def test_reptile_carries_adams_state_from_task_to_task_only_when_persisting(state):
    algorithm, episode = reptile(state), random_episode(3, tasks=3)
    tasks = [(torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y])) for t in episode]
    if state == "persist":
        adapted, count = hand_adam_tasks(algorithm.model, tasks, 0.05, 3)
    else:
        adapted = [hand_adam_tasks(algorithm.model, [task], 0.05, 3)[0][0] for task in tasks]
    algorithm.meta_gradient(episode)
    initial = list(algorithm.model.parameters())
    for i, phi in enumerate(initial):
        expected = sum(phi.detach() - w[i] for w in adapted) / len(tasks)
        torch.testing.assert_close(phi.grad, expected, rtol=1e-9, atol=1e-12)
    if state == "persist":
        assert count == 9  # 3 tasks x 3 steps
        assert [s["step"] for s in algorithm.inner.carried_state] == [count] * len(initial)
    else:
        assert algorithm.inner.carried_state is None


def test_evaluation_tasks_start_from_the_carried_state_and_leave_it_unchanged():
    """The evaluation task's weights are Adam's written out from the carried moments and step
    count (6 steps taken: 2 tasks x 3), not from zeros (what ``reset`` gives, also checked); the
    carried state is the same after the task."""
    algorithm, episode = reptile("persist"), random_episode(4, tasks=2)
    algorithm.meta_gradient(episode)
    carried = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
               for s in algorithm.inner.carried_state]
    assert {s["step"] for s in carried} == {6}
    task = next(iter(random_episode(5, tasks=1)))
    persisted = list(algorithm.adapt(task.support_x, task.support_y).parameters())
    for before, after in zip(carried, algorithm.inner.carried_state, strict=True):
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else before[k] == after[k]
                   for k in before)
    support = [(task.support_x, task.support_y)]
    (from_carried,), _ = hand_adam_tasks(algorithm.model, support, 0.05, 3, state=carried)
    (from_zeros,), _ = hand_adam_tasks(algorithm.model, support, 0.05, 3)
    for got, want in zip(persisted, from_carried, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)
    fresh = reptile("reset")
    fresh.load_state_dict(algorithm.state_dict())
    reset = list(fresh.adapt(task.support_x, task.support_y).parameters())
    for got, want in zip(reset, from_zeros, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(a, b) for a, b in zip(from_carried, from_zeros, strict=True))


def test_inner_state_option_defaults_and_checks():
    assert resolve_config(dataset="omniglot", algorithm="reptile").inner_state == "persist"
    assert resolve_config(dataset="miniimagenet", algorithm="reptile").inner_state == "persist"
    assert resolve_config(dataset="omniglot", algorithm="fomaml").inner_state == "reset"
    with pytest.raises(DiffoptError, match="choose one of: persist, reset"):
        resolve_config(inner_state="keep")
    with pytest.raises(DiffoptError, match="carry the inner state from task to task .fomaml, reptile.; "
                       "use --inner_state reset with maml"):
        resolve_config(algorithm="maml", inner_state="persist")
    with pytest.raises(DiffoptError, match="--task_threads 1"):
        resolve_config(algorithm="reptile", inner_state="persist", task_threads=2)
    model = small_algorithm().model
    with pytest.raises(DiffoptError, match="use --inner_state reset with maml"):
        build_algorithm("maml", model, InnerLoop("adam", 0.1, 1, state="persist"), F.mse_loss)


def test_a_resumed_run_continues_from_the_saved_inner_state(tmp_path):
    """A run stopped after one iteration (by its budget), its budget lifted and resumed, ends
    with the same weights and inner state as a run never stopped."""
    options = dict(algorithm="reptile", inner_optimizer="adam", inner_state="persist", inner_steps=2,
                   iterations=6, meta_batch_size=3, shots=4, hidden=(8,), checkpoint_every=1,
                   progress=False)
    whole = train(resolve_config(**options, run_dir=str(tmp_path / "whole")))
    stopped = tmp_path / "stopped"
    assert train(resolve_config(**options, run_dir=str(stopped), max_seconds=1e-9)).iterations == 1
    payload = load_checkpoint(stopped)
    assert [s["step"] for s in payload["inner_state"]] == [6] * 4  # 3 tasks x 2 steps
    payload["config"]["max_seconds"] = None
    save_checkpoint(stopped / "checkpoint.pt", payload)
    resumed = resume(stopped)
    assert resumed.iterations == 6
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(stopped)
    for name, tensor in a["algorithm"].items():
        assert torch.equal(tensor, b["algorithm"][name]), name
    assert [s["step"] for s in b["inner_state"]] == [36] * 4
    for x, y in zip(a["inner_state"], b["inner_state"], strict=True):
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
    assert whole.algorithm.inner.carried_state is not None


def test_a_run_saved_before_the_faithful_defaults_is_rebuilt_as_it_was_trained():
    """Options added with the protocol audit default to the original code's values; a config saved
    without them (an older run) gets what diffopt did then, so it loads, evaluates and compares as
    trained. A config saved with them comes back unchanged."""
    from diffopt.config import SAVED_BEFORE, resolve_saved_config

    today = resolve_config(dataset="omniglot", algorithm="maml")
    assert resolve_saved_config(today.to_dict()) == today
    older = {k: v for k, v in today.to_dict().items() if k not in SAVED_BEFORE}
    rebuilt = resolve_saved_config(older)
    assert (rebuilt.head, rebuilt.init, rebuilt.norm_eps, rebuilt.inner_loss_reduction) == (
        "flatten", "torch", 1e-5, "mean")
    assert (today.head, today.init, today.inner_loss_reduction, today.inner_params) == (
        "mean", "glorot_normal_output", "class_sum", "weights")
    assert rebuilt.inner_params == "all"
    assert (today.padding, rebuilt.padding) == ("same", "symmetric")
    assert (today.query_norm_row, rebuilt.query_norm_row) == ("last_step", "steps_taken")
    older_reptile = resolve_config(dataset="miniimagenet", algorithm="reptile").to_dict()
    assert resolve_config(**older_reptile).pool_padding == "same"
    del older_reptile["pool_padding"]
    assert resolve_saved_config(older_reptile).pool_padding == "valid"
