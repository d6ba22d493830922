"""Checkpointed unrolls (``InnerLoop(checkpoint=k)``, diffopt/recompute.py): the same meta-gradient
as the plain second-order unroll, finite differences, the graph they keep, and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffopt.algorithms import build_algorithm
from diffopt.algorithms.mamlpp import multi_step_loss_weights
from diffopt.data.episode import Episode
from diffopt.errors import DiffoptError
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.models import MLP, Conv4
from diffopt.recompute import segment_length

RULES = ["sgd", "momentum", "adam", "rmsprop", "adagrad", "adamw", "lslr", "meta_sgd", "meta_curvature"]


def mlp_algorithm(name, optimizer, steps, checkpoint, seed=0, **inner):
    torch.manual_seed(seed)
    model = MLP(1, 1, (8, 8), "tanh").double()
    loop = InnerLoop(optimizer, 0.1, steps, model=model, checkpoint=checkpoint, **inner)
    return build_algorithm(name, model, loop, F.mse_loss, vectorize="never")


def meta_gradient(algorithm, episode) -> list[torch.Tensor]:
    for param in algorithm.parameters():
        param.grad = torch.zeros_like(param)
    algorithm.meta_gradient(episode)
    return [param.grad.clone() for param in algorithm.parameters()]


def largest_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """The largest element difference relative to the largest gradient element."""
    scale = max(g.abs().max().item() for g in first)
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True)) / scale


@pytest.mark.parametrize("optimizer", RULES)
@pytest.mark.parametrize(("steps", "checkpoint"), [(5, 1), (5, 2), (7, "auto"), (4, 4)])
def test_checkpointed_maml_equals_the_plain_unroll(optimizer, steps, checkpoint):
    """Every rule, segments of every length (one step, uneven, one segment): to 1e-10 in float64,
    meta-parameters of learned rules included."""
    episode = random_episode(1, tasks=2, shots=5, queries=6)
    plain = meta_gradient(mlp_algorithm("maml", optimizer, steps, None), episode)
    checkpointed = meta_gradient(mlp_algorithm("maml", optimizer, steps, checkpoint), episode)
    assert len(plain) == len(checkpointed)
    assert largest_difference(plain, checkpointed) < 1e-10


@pytest.mark.parametrize("name", ["anil", "boil"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lslr"])
def test_checkpointed_partial_unrolls_equal_the_plain_ones(name, optimizer):
    """ANIL adapts the head on features that depend on the body (the segment's input x carries
    their gradient); BOIL adapts the body, the head passing through the segments unchanged."""
    episode = random_episode(2, tasks=2, shots=4, queries=5)
    plain = meta_gradient(mlp_algorithm(name, optimizer, 6, None), episode)
    checkpointed = meta_gradient(mlp_algorithm(name, optimizer, 6, 4), episode)
    assert largest_difference(plain, checkpointed) < 1e-10
    assert all(g.abs().max() > 0 for g in checkpointed)  # the body reached under ANIL too


@pytest.mark.parametrize("first_order", [False, True])
def test_checkpointed_mamlpp_with_per_step_batch_norm(first_order):
    """MAML++: a conv-4 with per-step batch norm (running statistics per step), LSLR, the
    multi-step loss and, in its first epochs, detached inner gradients: the same meta-gradient
    and the same running statistics afterwards (the recomputation must not move them again)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 10, 1, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(5).repeat(2, 2)
    episode = Episode(images[:, :5], labels[:, :5], images[:, 5:], labels[:, 5:])
    results = []
    for checkpoint in (None, 2):
        torch.manual_seed(0)
        model = Conv4(1, 5, hidden=4, image_size=16, pool=True, norm="per_step_batch", steps=5).double()
        loop = InnerLoop("lslr", 0.1, 5, model=model, checkpoint=checkpoint)
        maml = build_algorithm("maml", model, loop, F.cross_entropy, vectorize="never")
        maml.step_weights, maml.first_order = multi_step_loss_weights(5, 1, 10), first_order
        grads = meta_gradient(maml, episode)
        results.append((grads, [b.clone() for b in model.buffers()]))
    (plain, plain_buffers), (checkpointed, checkpointed_buffers) = results
    assert largest_difference(plain, checkpointed) < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(plain_buffers, checkpointed_buffers, strict=True))


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    optimizer=st.sampled_from(["sgd", "momentum", "adam", "lslr", "meta_curvature"]),
    steps=st.integers(2, 6),
    segment=st.integers(1, 6),
    lr=st.floats(0.01, 0.2),
    seed=st.integers(0, 2**16),
)
def test_checkpointed_meta_gradient_matches_finite_differences(optimizer, steps, segment, lr, seed):
    assume(segment <= steps)
    torch.manual_seed(seed)
    model = MLP(1, 1, (5,), "tanh").double()
    loop = InnerLoop(optimizer, lr, steps, model=model, checkpoint=segment)
    algorithm = build_algorithm("maml", model, loop, F.mse_loss, vectorize="never")
    episode = random_episode(seed, 2, 4, 4)
    if optimizer == "adam":  # Adam's sign-like first step: see test_gradients.py
        first = torch.autograd.grad(F.mse_loss(model(episode.support_x[0]), episode.support_y[0]),
                                    list(model.parameters()))
        assume(min(g.abs().min().item() for g in first) > 1e-3)
    result = check_meta_gradient(algorithm, episode)
    assert result.max_rel_error < 1e-5, result.per_parameter


class SavedBytes:
    """The largest number of bytes autograd held in saved tensors at once, over what ran inside."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return _Held(self, tensor, size)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, owner: SavedBytes, tensor: torch.Tensor, size: int) -> None:
        self.owner, self.tensor, self.size = owner, tensor, size

    def __del__(self) -> None:
        self.owner.live -= self.size


def graph_peak(steps: int, checkpoint, optimizer: str = "adam", **inner) -> int:
    """Peak saved-tensor bytes of one task's meta-gradient through a 1-64-64-1 MLP, 20 examples."""
    torch.manual_seed(0)
    model = MLP(1, 1, (64, 64), "tanh")
    loop = InnerLoop(optimizer, 0.01, steps, model=model, checkpoint=checkpoint, **inner)
    x, y = torch.randn(20, 1), torch.randn(20, 1)
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        *_, adapted = loop.unroll(model, F.mse_loss, x, y)
        loss = F.mse_loss(adapted(x), y)
        torch.autograd.grad(loss, list(model.parameters()))
        del adapted, loss
    return counter.peak


def test_a_checkpointed_unroll_keeps_a_bounded_graph():
    """The plain unroll's graph grows with the steps; the checkpointed one's with sqrt(steps):
    at 36 steps in segments of 6 it is below the plain unroll's at 12 steps, and a sixth of the
    plain unroll's at 36 or less."""
    plain_12, plain_36 = graph_peak(12, None), graph_peak(36, None)
    checkpointed_36 = graph_peak(36, "auto")
    assert plain_36 > 2.5 * plain_12  # linear in the steps
    assert checkpointed_36 < plain_12
    assert checkpointed_36 < plain_36 / 6 * 1.5


def test_segment_lengths():
    assert [segment_length("auto", t) for t in (1, 4, 5, 10, 100)] == [1, 2, 3, 4, 10]
    assert segment_length(3, 2) == 2  # an evaluation unroll shorter than a segment


@pytest.mark.parametrize("value", [0, -1, 6, 2.5, True, "abc"])
def test_bad_checkpoints_are_one_line_errors(value):
    with pytest.raises(DiffoptError, match=r"--inner_checkpoint is auto or a whole number .* \(5\)"):
        InnerLoop("sgd", 0.1, 5, checkpoint=value)


@pytest.mark.parametrize("name", ["fomaml", "reptile", "imaml"])
def test_algorithms_that_do_not_differentiate_the_unroll_refuse_a_checkpoint(name):
    model = MLP(1, 1, (4,), "tanh")
    loop = InnerLoop("sgd", 0.1, 3, checkpoint=1, proximal=1.0 if name == "imaml" else 0.0)
    with pytest.raises(DiffoptError, match="nothing to checkpoint"):
        build_algorithm(name, model, loop, F.mse_loss, vectorize="never")


def test_checkpointed_unrolls_loop_over_tasks():
    model = MLP(1, 1, (4,), "tanh")
    loop = InnerLoop("sgd", 0.1, 3, checkpoint=1)
    assert not build_algorithm("maml", model, loop, F.mse_loss, vectorize="auto").vectorized
    with pytest.raises(DiffoptError, match="checkpointed unrolls run per task"):
        build_algorithm("maml", model, loop, F.mse_loss, vectorize="always")


def test_gradcheck_checks_the_checkpointed_unroll(capsys):
    from diffopt import cli

    cli.gradcheck_command(inner_optimizer="adam", inner_steps=4, inner_checkpoint=2, hidden=(4,),
                          vectorize="never")
    out = capsys.readouterr().out
    assert "inner adam checkpointed every 2" in out and "PASS" in out


def test_dry_run_shows_the_checkpoint_and_runs_the_constructors_checks(capsys):
    from diffopt import cli

    cli.train_command(dry_run=True, inner_steps=9, inner_checkpoint="auto", progress=False)
    assert '"inner_checkpoint": "auto"' in capsys.readouterr().out
    with pytest.raises(DiffoptError, match="nothing to checkpoint"):
        cli.train_command(dry_run=True, algorithm="reptile", inner_checkpoint=1, progress=False)
    with pytest.raises(DiffoptError, match="does not meta-learn the parameters of the inner rule"):
        cli.train_command(dry_run=True, algorithm="fomaml", inner_optimizer="lslr", progress=False)


def test_training_with_a_checkpoint_trains_the_same_model(tmp_path):
    """``diffopt train --inner_checkpoint``: the same meta-parameters after 5 meta-iterations as the
    plain unroll's (float32 rounding apart), and evaluation reads the run like any other."""
    from diffopt.config import resolve_config
    from diffopt.data import get_dataset
    from diffopt.evaluate import evaluate
    from diffopt.train import load_trained, train

    trained = []
    for checkpoint in (None, 2):
        folder = str(tmp_path / f"run-{checkpoint}")
        config = resolve_config(iterations=5, inner_steps=4, inner_checkpoint=checkpoint, meta_batch_size=3,
                                vectorize="never", progress=False, run_dir=folder)
        result = train(config)
        trained.append([p.detach().clone() for p in result.algorithm.parameters()])
    assert largest_difference(*trained) < 1e-5
    _, algorithm, _ = load_trained(tmp_path / "run-2")
    assert algorithm.inner.checkpoint == 2
    scores = evaluate(algorithm, get_dataset("sinusoid"), shots=5, test_shots=10, tasks=4, steps=(0, 1))
    assert set(scores.scores) == {0, 1}

