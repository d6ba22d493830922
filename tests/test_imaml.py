"""Implicit MAML: its meta-gradient against a closed form, finite differences, and its memory."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffopt import InnerLoop
from diffopt.algorithms import IMAML, MAML
from diffopt.algorithms.imaml import conjugate_gradient
from diffopt.algorithms.imaml import inner_residual as IMAML_RESIDUAL
from diffopt.data.episode import Episode
from diffopt.errors import DiffoptError
from diffopt.gradcheck import check_meta_gradient
from diffopt.memory import StepMemory, reset_resident_peak


def _episode(tasks: int, support: int, query: int, features: int, seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(tasks, support, features, generator=g, dtype=torch.float64),
                   torch.randn(tasks, support, 1, generator=g, dtype=torch.float64),
                   torch.randn(tasks, query, features, generator=g, dtype=torch.float64),
                   torch.randn(tasks, query, 1, generator=g, dtype=torch.float64))


def _gradient(algorithm) -> list[torch.Tensor]:
    return [p.grad.clone() for p in algorithm.parameters()]


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(lam=st.floats(0.5, 8.0), seed=st.integers(0, 10_000))
def test_on_a_quadratic_inner_loss_the_implicit_gradient_is_the_closed_form(lam, seed):
    """Linear regression: the proximal inner problem's solution is w* = (H + lam I)^-1 (lam phi +
    2/n A^T y) with A = [x, 1], H = 2/n A^T A, and the query loss at w* differentiates through
    that solve exactly; iMAML's converged inner loop and CG must give the same gradient."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 1).double()
    episode = _episode(2, 6, 7, 3, seed)
    steps = 400  # the inner loop contracts by at most 1 - lr lam per step: (1 - 0.05 * 0.5)^400 < 1e-4
    algorithm = IMAML(model, InnerLoop("sgd", 0.05, steps, proximal=lam), F.mse_loss, cg_steps=50)
    algorithm.meta_gradient(episode)
    implicit = _gradient(algorithm)

    phi = torch.cat([model.weight.detach().view(-1), model.bias.detach()]).requires_grad_()
    total = 0.0
    for task in episode:
        a = torch.cat([task.support_x, torch.ones(len(task.support_x), 1, dtype=torch.float64)], 1)
        n = len(a)
        hessian = 2 / n * a.T @ a
        w = torch.linalg.solve(hessian + lam * torch.eye(4, dtype=torch.float64),
                               lam * phi + 2 / n * a.T @ task.support_y.view(-1))
        prediction = task.query_x @ w[:3] + w[3]
        total = total + F.mse_loss(prediction, task.query_y.view(-1)) / len(episode)
    (closed,) = torch.autograd.grad(total, phi)
    assert torch.allclose(torch.cat([g.view(-1) for g in implicit]), closed, rtol=1e-6, atol=1e-9)
    # the test can fail: without the linear solve (first order) the gradient is another one
    algorithm.zero_grad()
    algorithm.cg_steps = 0
    algorithm.meta_gradient(episode)
    first_order = torch.cat([g.view(-1) for g in _gradient(algorithm)])
    assert not torch.allclose(first_order, closed, rtol=1e-3, atol=1e-6)


SOLVERS = {  # iMAML's inner solvers, each converging the 1-6-6-1 tanh MLP's proximal problem
    "gradient": dict(optimizer="sgd", lr=0.1, steps=100),
    # its backtracking must go on down to float64 rounding, or the solution stalls near
    # sqrt(eps) and finite differences see it (1.6e-2 relative before that was fixed)
    "gauss_newton": dict(optimizer="sgd", lr=1.0, steps=20, solver="gauss_newton", backtrack=True),
}


PAIRWISE = [  # every pair of (adapted tensors, path, solver) values occurs in some case
    ("all", "never", "gradient"), ("all", "always", "gauss_newton"),
    ("head", "never", "gauss_newton"), ("head", "always", "gradient"),
    ("body", "never", "gradient"), ("body", "always", "gauss_newton"),
]


@pytest.mark.slow
@pytest.mark.parametrize("params, vectorize, solver", PAIRWISE, ids=["-".join(case) for case in PAIRWISE])
@settings(max_examples=1, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(4.0, 8.0))
def test_implicit_gradient_matches_finite_differences_of_the_converged_inner_solution(
        params, vectorize, solver, seed, lam):
    """A 1-6-6-1 tanh MLP (Hessian of the support loss not positive definite, lambda above its
    negative curvature): with 100 inner steps of 0.1 the proximal problem contracts by about
    1 - 0.1 lambda <= 0.6 a step (0.6^100 ~ 1e-22) and CG runs to a residual 1e-10 of the
    gradient, so the implicit gradient is the derivative of the query loss at the inner loop's
    result up to float64 central differences (eps 1e-6: about 1e-9 relative); bound 1e-6.
    ``head``/``body``: the tensors the inner loop leaves alone get the cross term. Both paths:
    the loop (CG stops once solved) and vmap (exactly ``cg_steps`` iterations, 60 > 55 unknowns).
    The same for 20 backtracking Gauss-Newton steps (``SOLVERS``). Which cases: every value of
    each of the three (adapted tensors, path, solver) with every value of each other one
    (``PAIRWISE``: six gradient checks, not the product's twelve, each about a minute on a loaded
    2-core machine); Hypothesis draws each case's seed and lambda."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    algorithm = IMAML(model, InnerLoop(**SOLVERS[solver], proximal=lam, params=params), F.mse_loss,
                      cg_steps=60, vectorize=vectorize)
    assert algorithm.vectorized == (vectorize == "always")
    result = check_meta_gradient(algorithm, _episode(2, 5, 5, 1, seed).to(dtype=torch.float32))
    assert result.max_rel_error < 1e-6, result.per_parameter


@pytest.mark.slow
def test_the_cross_term_of_tensors_the_inner_loop_leaves_alone_matters():
    """Dropping H[body, head] v / lambda from the body's gradient (ANIL-style inner loop) must
    show in the gradient check: the check of the test above can fail."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1))
    algorithm = IMAML(model, InnerLoop("sgd", 0.1, 100, proximal=4.0, params="head"), F.mse_loss,
                      cg_steps=200, vectorize="never")
    episode = _episode(2, 5, 5, 1, 3).to(dtype=torch.float32)
    assert check_meta_gradient(algorithm, episode).max_rel_error < 1e-6
    direct_only = IMAML._task_terms

    def without_cross_term(self, task, scale=1.0):
        grads, loss, residual = direct_only(self, task, scale)
        solved = self._solve(task)
        query = self.loss_fn(solved(task.query_x), task.query_y) * scale
        plain = torch.autograd.grad(query, list(solved.parameters()))
        return ([g if i >= 2 else p for i, (g, p) in enumerate(zip(grads, plain, strict=True))],
                loss, residual)

    IMAML._task_terms = without_cross_term
    try:
        assert check_meta_gradient(algorithm, episode).max_rel_error > 1e-3
    finally:
        IMAML._task_terms = direct_only


def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    (x,) = conjugate_gradient(lambda v: [a @ v[0]], [b], steps=6)
    assert torch.allclose(a @ x, b, atol=1e-10)
    (partial,) = conjugate_gradient(lambda v: [a @ v[0]], [b], steps=2)
    assert not torch.allclose(a @ partial, b, atol=1e-3)
    (same,) = conjugate_gradient(lambda v: [a @ v[0]], [b], steps=0)
    assert torch.equal(same, b)


@pytest.mark.parametrize("params", ["all", "body"])
def test_loop_and_vmap_compute_the_same_implicit_gradient(params):
    """A 1-40-40-1 ReLU MLP on 4 tasks, 3 inner steps, 5 CG iterations (neither path has solved
    the system: they must take the same iterations), float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    episode = _episode(4, 5, 7, 1, 0)
    grads = []
    for vectorize in ("never", "always"):
        algorithm = IMAML(model, InnerLoop("sgd", 0.01, 3, proximal=1.0, params=params), F.mse_loss,
                          vectorize=vectorize).double()
        algorithm.zero_grad()
        algorithm.meta_gradient(episode)
        grads.append(_gradient(algorithm))
    for loop, vmapped in zip(*grads, strict=True):
        assert torch.allclose(loop, vmapped, rtol=1e-10, atol=1e-12)
    assert max(g.abs().max() for g in grads[0]) > 1e-3


@pytest.mark.parametrize("vectorize", ["never", "always"])
def test_inner_residual_tells_a_solved_inner_problem_from_an_unsolved_one(vectorize):
    """``inner_residual`` (logged by every meta-step) is ~0 once the inner steps have solved the
    proximal problem and near 1 when they barely moved (5 steps of 0.01 with lambda 1, the
    configuration that trained sinusoid iMAML to no better than predicting zero); the loop and
    vmap paths agree; the unsolved one warns, once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    episode = _episode(3, 5, 7, 1, 0)
    solved = IMAML(model, InnerLoop("sgd", 0.1, 100, proximal=5.0), F.mse_loss, vectorize=vectorize)
    residual = solved.meta_gradient(episode)["inner_residual"]
    assert residual < 1e-8
    unsolved = IMAML(model, InnerLoop("sgd", 0.01, 5, proximal=1.0), F.mse_loss, vectorize=vectorize)
    with pytest.warns(UserWarning, match="far from solved"):
        residual = unsolved.meta_gradient(episode)["inner_residual"]
    assert 0.8 < residual <= 1.0  # about (1 - 0.05) / (1 + 0.05): the steps moved w by 0.05 g
    other = IMAML(model, InnerLoop("sgd", 0.01, 5, proximal=1.0), F.mse_loss,
                  vectorize="always" if vectorize == "never" else "never")
    with pytest.warns(UserWarning):
        assert other.meta_gradient(episode)["inner_residual"] == pytest.approx(residual, rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unsolved.meta_gradient(episode)  # warned once already: no second warning


def test_imaml_needs_a_proximal_term():
    model = nn.Linear(1, 1)
    with pytest.raises(DiffoptError, match="--inner_proximal"):
        IMAML(model, InnerLoop("sgd", 0.1, 2), F.mse_loss)
    with pytest.raises(DiffoptError, match="cg_steps"):
        IMAML(model, InnerLoop("sgd", 0.1, 2, proximal=1.0), F.mse_loss, cg_steps=-1)


def test_the_proximal_term_pulls_the_inner_loop_towards_the_initial_weights():
    """Each path (higher, first order, functional) descends loss + lambda/2 ||w - w0||^2."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    start = [p.detach().clone() for p in model.parameters()]
    for kwargs in [dict(track_higher_grads=True), dict(track_higher_grads=False),
                   dict(track_higher_grads=True, functional=True)]:
        moved = {}
        for lam in (0.0, 50.0):
            inner = InnerLoop("sgd", 0.01, 20, proximal=lam)
            adapted = inner.adapt(model, F.mse_loss, x, y, **kwargs)
            pairs = zip(adapted.parameters(), start, strict=True)
            moved[lam] = sum((w - w0).norm() ** 2 for w, w0 in pairs).item()
        assert moved[50.0] < 0.5 * moved[0.0], kwargs


@pytest.fixture
def one_thread():
    """One intra-op thread for this test alone (threads' scratch buffers blur the resident set),
    the count put back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.skipif(not reset_resident_peak(), reason="needs /proc/self/clear_refs")
def test_imaml_memory_does_not_grow_with_inner_steps_maml_does(one_thread):
    """Peak growth of a meta-step (diffopt.memory.StepMemory) at 5 and 40 inner steps: MAML keeps
    every step's activations for its backward (about 3 x 8 MB a step here), iMAML none."""
    torch.manual_seed(0)
    episode = Episode(torch.randn(1, 4096, 1), torch.randn(1, 4096, 1), torch.randn(1, 64, 1),
                      torch.randn(1, 64, 1))

    def growth(cls, steps: int, **kwargs) -> float:
        model = nn.Sequential(nn.Linear(1, 512), nn.Tanh(), nn.Linear(512, 1))
        algorithm = cls(model, InnerLoop("sgd", 0.01, steps, proximal=1.0), F.mse_loss,
                        vectorize="never", **kwargs)
        memory = StepMemory("cpu")
        for _ in range(2):  # the second step: allocator pools warmed up
            with memory.measured():
                algorithm.meta_gradient(episode)
        return memory.peak_growth_mb

    imaml = {steps: growth(IMAML, steps, cg_steps=5) for steps in (5, 40)}
    maml = {steps: growth(MAML, steps) for steps in (5, 40)}
    # the yardstick from the shapes: a step's graph keeps at least its 4096 x 512 hidden
    # activation (float32) for the backward, so 35 more steps keep at least 35 of them
    activation_mb = 4096 * 512 * 4 / 2**20
    assert maml[40] - maml[5] > 35 * activation_mb, maml  # the measure sees the graphs grow
    # iMAML's growth with the steps, against MAML's measured in this test (iMAML measured 24, 0,
    # 56, 16 MB at 5, 10, 20, 40 steps: allocator noise; MAML about 24 MB a step): flat
    assert imaml[40] - imaml[5] < 0.25 * (maml[40] - maml[5]), (imaml, maml)
    assert imaml[40] < maml[40] / 4, (imaml, maml)


def test_imaml_from_the_command_line(capsys):
    """gradcheck converges the inner loop for imaml by default; train's options resolve per
    dataset (imaml_dev's Omniglot settings) and --cg_steps belongs to imaml alone."""
    from diffopt.cli import main
    from diffopt.config import resolve_config

    assert main(["gradcheck", "--algorithm", "imaml", "--hidden", "4", "--inner_params", "head"]) == 0
    out = capsys.readouterr().out
    assert "imaml: inner sgd lr=0.1 steps=100 adapting head" in out
    assert "inner proximal term lambda=5, 1000 CG iterations at most" in out
    assert out.strip().endswith("PASS (rtol 1e-05)")
    sinusoid = resolve_config(algorithm="imaml")
    omniglot = resolve_config(algorithm="imaml", dataset="omniglot")
    assert (sinusoid.inner_proximal, sinusoid.cg_steps, sinusoid.inner_solver) == (100.0, 5, "gauss_newton")
    assert (omniglot.inner_proximal, omniglot.inner_steps, omniglot.inner_lr, omniglot.meta_batch_size,
            omniglot.norm, omniglot.test_shots) == (2.0, 16, 0.1, 32, "batch", 1)
    assert resolve_config(algorithm="maml").inner_proximal == 0.0
    with pytest.raises(DiffoptError, match="--cg_steps is imaml's linear solve"):
        resolve_config(algorithm="maml", cg_steps=3)
    with pytest.raises(DiffoptError, match="--inner_proximal must be a finite number > 0"):
        resolve_config(algorithm="imaml", inner_proximal=0)


def test_imaml_residual_script_reports_a_trained_runs_residual(tmp_path, capsys):
    """examples/imaml_residual.py on a run trained with the unsolved configuration reports its
    residual (near 1) and refuses a run of another algorithm, naming it."""
    import runpy
    from pathlib import Path

    from diffopt.config import resolve_config
    from diffopt.train import train

    script = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "imaml_residual.py"))
    for algorithm in ("imaml", "anil"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unsolved = dict(inner_solver="gradient", inner_backtrack=False, inner_steps=5, inner_lr=0.01,
                            inner_proximal=1.0) if algorithm == "imaml" else {}
            train(resolve_config(dataset="sinusoid", algorithm=algorithm, iterations=2,
                                 run_dir=str(tmp_path / algorithm), **unsolved))
    script["main"](str(tmp_path / "imaml"), tasks=4)
    value = float(capsys.readouterr().out.split("inner_residual ")[1].split(",")[0])
    assert 0.5 < value <= 1.0  # 5 steps of 0.01 with lambda 1 barely move the weights
    with pytest.raises(DiffoptError, match="trained anil, not imaml"):
        script["main"](str(tmp_path / "anil"))


def _proximal_objective(model: nn.Module, adapted: nn.Module, x, y, lam: float) -> float:
    pairs = zip(adapted.parameters(), model.parameters(), strict=True)
    return (F.mse_loss(adapted(x), y) + lam / 2 * sum(((w - w0) ** 2).sum() for w, w0 in pairs)).item()


@pytest.mark.parametrize("functional", [False, True])
def test_backtracking_steps_converge_where_fixed_steps_diverge(functional):
    """An inner lr ten times past the stability bound of a sharp task: fixed steps blow the
    proximal objective up, backtracking steps (``InnerLoop(backtrack=True)``) never raise it
    and solve the problem (inner_residual ~0); both stepping paths (first order, functional)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = 3 * torch.randn(6, 1, dtype=torch.float64)
    y = torch.sin(x)
    lam, lr = 10.0, 2.0  # lr x lam alone is 20 > 2: every fixed step overshoots
    start = _proximal_objective(model, model, x, y, lam)
    fixed = InnerLoop("sgd", lr, 30, proximal=lam)
    adapted = fixed.adapt(model, F.mse_loss, x, y, track_higher_grads=False, functional=functional)
    blown = _proximal_objective(model, adapted, x, y, lam)
    assert not blown < 100 * start  # diverged (or non-finite)
    careful = InnerLoop("sgd", lr, 60, proximal=lam, backtrack=True)
    objectives = [_proximal_objective(model, m, x, y, lam) for m in careful.unroll(
        model, F.mse_loss, x, y, track_higher_grads=False, functional=functional)]
    # never up, beyond float64 rounding (backtrack.ROUNDING units)
    assert all(b <= a * (1 + 1e-14) for a, b in zip(objectives, objectives[1:], strict=False))
    assert objectives[-1] < objectives[0]
    *_, solved = careful.unroll(model, F.mse_loss, x, y, track_higher_grads=False, functional=functional)
    weights = list(solved.parameters())
    grads = torch.autograd.grad(F.mse_loss(solved(x), y), weights)
    residual = IMAML_RESIDUAL(list(grads), [w.detach() for w in weights], list(model.parameters()), lam,
                              [True] * len(weights))
    assert residual < 1e-6


def test_backtracking_loop_and_vmap_agree():
    """iMAML with backtracking steps: the loop (first order path) and vmap (functional path)
    give the same meta-gradient and residual, each task keeping its own step scale; a
    higher-only optimizer (rmsprop) is refused with a message naming the fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    episode = _episode(4, 5, 7, 1, 0)
    episode = Episode(3 * episode.support_x, episode.support_y, episode.query_x, episode.query_y)
    results, grads = [], []
    for vectorize in ("never", "always"):
        algorithm = IMAML(model, InnerLoop("sgd", 0.5, 10, proximal=2.0, backtrack=True), F.mse_loss,
                          vectorize=vectorize).double()
        algorithm.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(algorithm.meta_gradient(episode))
        grads.append(_gradient(algorithm))
    assert results[0]["inner_residual"] == pytest.approx(results[1]["inner_residual"], rel=1e-9)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-9)
    for loop, vmapped in zip(*grads, strict=True):
        assert torch.allclose(loop, vmapped, rtol=1e-9, atol=1e-12)
    plain = IMAML(model, InnerLoop("sgd", 0.5, 10, proximal=2.0), F.mse_loss, vectorize="never").double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unguarded = plain.meta_gradient(episode)
    assert not unguarded["loss"] < 10 * results[0]["loss"]  # the same steps without backtracking blow up
    with pytest.raises(DiffoptError, match="backtracking inner steps run without higher"):
        InnerLoop("rmsprop", 0.1, 2, proximal=1.0, backtrack=True)  # refused before any work


def test_inner_backtrack_option():
    """--inner_backtrack resolves for imaml, is refused for an algorithm that differentiates its
    inner loop, and must be a bool; runs saved before it existed load without it."""
    from diffopt.config import resolve_config, resolve_saved_config

    assert resolve_config(algorithm="imaml", inner_backtrack=True).inner_backtrack is True
    assert resolve_config(algorithm="imaml", dataset="omniglot").inner_backtrack is False
    with pytest.raises(DiffoptError, match="--inner_backtrack is for imaml"):
        resolve_config(algorithm="maml", inner_backtrack=True)
    with pytest.raises(DiffoptError, match="--inner_backtrack must be True or False"):
        resolve_config(algorithm="imaml", inner_backtrack="yes")
    saved = resolve_config(algorithm="imaml").to_dict()
    del saved["inner_backtrack"]
    assert resolve_saved_config(saved).inner_backtrack is False


def test_one_gauss_newton_step_solves_a_quadratic_inner_problem():
    """Linear regression: the Gauss-Newton model of the proximal problem is the problem itself,
    so one full step (lr 1) lands on its closed-form solution w* = (H + lam I)^-1 (lam phi +
    2/n A^T y), on the loop and under vmap."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    episode = _episode(3, 6, 7, 3, 1)
    lam = 0.7
    phi = torch.cat([model.weight.detach().view(-1), model.bias.detach()])
    for vectorize in ("never", "always"):
        algorithm = IMAML(model, InnerLoop("sgd", 1.0, 1, proximal=lam, solver="gauss_newton"), F.mse_loss,
                          vectorize=vectorize)
        assert algorithm.meta_gradient(episode)["inner_residual"] < 1e-12
        for task in episode:
            a = torch.cat([task.support_x, torch.ones(len(task.support_x), 1, dtype=torch.float64)], 1)
            n = len(a)
            closed = torch.linalg.solve(2 / n * a.T @ a + lam * torch.eye(4, dtype=torch.float64),
                                        lam * phi + 2 / n * a.T @ task.support_y.view(-1))
            *_, solved = algorithm.unroll(task.support_x, task.support_y)
            weight, bias = solved.parameters()
            assert torch.allclose(torch.cat([weight.view(-1), bias.view(-1)]), closed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("params", ["all", "head"])
def test_gauss_newton_step_is_the_dense_solve_for_cross_entropy(params):
    """Classification (the loss's Hessian in the logits is singular: softmax): the step equals
    -(J^T H_o J + lam I)^-1 (grad L + lam (w - w0)) assembled densely from torch.func.jacrev and
    torch.func.hessian over the adapted tensors, after the weights have moved off w0."""
    from diffopt.fastweights import FunctionalModel
    from diffopt.unroll import gauss_newton_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    loop = InnerLoop("sgd", 1.0, 1, proximal=0.3, solver="gauss_newton", params=params)
    names = [name for name, _ in model.named_parameters()]
    anchor = [p.detach() for p in model.parameters()]
    weights = [w + 0.1 * torch.randn_like(w) for w in anchor]
    mask = [True] * 4 if params == "all" else [False, False, True, True]
    updates, _, _ = gauss_newton_step(loop, model, names, F.cross_entropy, weights, anchor, mask, x, y)

    chosen = [w for w, keep in zip(weights, mask, strict=True) if keep]

    def flat_weights(flat):
        out, start = [], 0
        for w, keep in zip(weights, mask, strict=True):
            if keep:
                out.append(flat[start:start + w.numel()].view(w.shape))
                start += w.numel()
            else:
                out.append(w)
        return out

    flat = torch.cat([w.reshape(-1) for w in chosen])
    logits = lambda f: FunctionalModel(model, names, flat_weights(f))(x).reshape(-1)  # noqa: E731
    jacobian = torch.func.jacrev(logits)(flat)
    h_out = torch.func.hessian(lambda o: F.cross_entropy(o.view(6, 3), y))(logits(flat))
    moved = flat - torch.cat([w.reshape(-1) for w, keep in zip(anchor, mask, strict=True) if keep])
    gradient = torch.func.grad(lambda f: F.cross_entropy(logits(f).view(6, 3), y))(flat) + 0.3 * moved
    identity = torch.eye(len(flat), dtype=torch.float64)
    dense = -torch.linalg.solve(jacobian.T @ h_out @ jacobian + 0.3 * identity, gradient)
    step = torch.cat([u.reshape(-1) for u in updates if u is not None])
    assert torch.allclose(step, dense, rtol=1e-9, atol=1e-12)
    assert [u is None for u in updates] == [not keep for keep in mask]


def test_gauss_newton_loop_and_vmap_agree_and_solve_an_mlp():
    """A 1-40-40-1 tanh MLP, 4 tasks: five backtracking Gauss-Newton steps leave a residual far
    below ten gradient steps' of the same lambda, and the loop and vmap paths agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1))
    episode = _episode(4, 5, 7, 1, 0)
    results, grads = [], []
    for vectorize in ("never", "always"):
        inner = InnerLoop("sgd", 1.0, 5, proximal=10.0, backtrack=True, solver="gauss_newton")
        algorithm = IMAML(model, inner, F.mse_loss, vectorize=vectorize).double()
        algorithm.zero_grad()
        results.append(algorithm.meta_gradient(episode))
        grads.append(_gradient(algorithm))
    assert results[0]["inner_residual"] == pytest.approx(results[1]["inner_residual"], rel=1e-9)
    for loop, vmapped in zip(*grads, strict=True):
        assert torch.allclose(loop, vmapped, rtol=1e-9, atol=1e-12)
    gradient = IMAML(model, InnerLoop("sgd", 0.01, 10, proximal=10.0, backtrack=True), F.mse_loss).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = gradient.meta_gradient(episode)["inner_residual"]
    assert results[0]["inner_residual"] < 0.01 * slow, (results[0]["inner_residual"], slow)


def test_inner_solver_option():
    from diffopt.config import resolve_config

    config = resolve_config(algorithm="imaml", inner_solver="gauss_newton", inner_lr=1.0)
    assert config.inner_solver == "gauss_newton"
    assert resolve_config(algorithm="imaml", dataset="omniglot").inner_solver == "gradient"
    with pytest.raises(DiffoptError, match="inner solver 'newton'; choose one of: gauss_newton, gradient"):
        resolve_config(algorithm="imaml", inner_solver="newton")
    with pytest.raises(DiffoptError, match="--inner_solver gauss_newton is for imaml"):
        resolve_config(algorithm="maml", inner_solver="gauss_newton")
    with pytest.raises(DiffoptError, match="drop --inner_optimizer"):
        resolve_config(algorithm="imaml", inner_solver="gauss_newton", inner_optimizer="adam")
    with pytest.raises(DiffoptError, match="needs a proximal term"):
        InnerLoop("sgd", 1.0, 1, solver="gauss_newton")
    loop = InnerLoop("sgd", 1.0, 1, proximal=1.0, solver="gauss_newton")
    with pytest.raises(DiffoptError, match="not differentiated"):
        loop.unroll(nn.Linear(1, 1), F.mse_loss, torch.randn(3, 1), torch.randn(3, 1),
                    track_higher_grads=True)


@pytest.mark.slow
def test_imamls_sinusoid_defaults_solve_the_inner_problem_and_learn(tmp_path):
    """`diffopt train --algorithm imaml` on the default dataset: every meta-iteration's inner
    residual small (0: solved; the gradient-step defaults left it near 1), and after a short run
    the adapted model clearly better than the untrained one adapted alike."""
    import json

    from diffopt.config import resolve_config
    from diffopt.data import get_dataset
    from diffopt.evaluate import evaluate
    from diffopt.train import build, train

    config = resolve_config(algorithm="imaml", iterations=200, run_dir=str(tmp_path / "run"), progress=False)
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(record["inner_residual"] for record in records) < 0.1
    after, before = (evaluate(algorithm, get_dataset("sinusoid"), shots=10, test_shots=20, tasks=60,
                              steps=(1,)).scores[1].mean() for algorithm in (result.algorithm, build(config)))
    assert after < 0.8 * before
