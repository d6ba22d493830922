"""The vmapped meta-batch: same meta-gradients, updates and scores as the loop over tasks, and
chosen only for models and rules it is proven on (the FD tests in test_gradients.py and
test_rules.py run on both paths)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode, small_algorithm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffopt import vectorize
from diffopt.algorithms import MAML, build_algorithm
from diffopt.data import Episode, get_dataset
from diffopt.errors import DiffoptError
from diffopt.evaluate import evaluate
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.memory import graph_bytes
from diffopt.models import MLP, Conv4, ShiftBatchNorm, initialize
from diffopt.models.conv4 import InputNorm
from diffopt.optim import UpdateRule
from diffopt.vectorize import loops_functionally, vmap_obstacle


def loop_and_vmap(name: str, rule: str, steps: int, lr: float = 0.1):
    torch.manual_seed(0)
    model = MLP(1, 1, (6, 5), "tanh").double()
    loop = build_algorithm(name, model, InnerLoop(rule, lr, steps, model=model), F.mse_loss, "never")
    vmapped = copy.deepcopy(loop)
    vmapped.vectorized = True
    return loop, vmapped


def grads(algorithm, episode):
    algorithm.zero_grad(set_to_none=True)
    metrics = algorithm.meta_gradient(episode)
    return metrics, [p.grad.clone() for p in algorithm.parameters()]


@pytest.mark.parametrize("name,rule", [("maml", "sgd"), ("maml", "lslr"), ("maml", "adamw"),
                                       ("maml", "meta_curvature+meta_sgd"), ("fomaml", "sgd"),
                                       ("reptile", "sgd")])
@pytest.mark.parametrize("steps", [1, 3])
def test_vmapped_meta_gradient_equals_the_loop(name, rule, steps):
    """FOMAML and Reptile have no meta-loss to gradcheck: this equality is their proof."""
    loop, vmapped = loop_and_vmap(name, rule, steps)
    episode = random_episode(3, tasks=4)
    loop_metrics, loop_grads = grads(loop, episode)
    vmap_metrics, vmap_grads = grads(vmapped, episode)
    assert loop_metrics["loss"] == pytest.approx(vmap_metrics["loss"], rel=1e-12)
    for a, b in zip(loop_grads, vmap_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert any(g.abs().max() > 0 for g in vmap_grads)


def test_mamlpp_first_order_mode_and_step_weights_match_the_loop():
    loop, vmapped = loop_and_vmap("maml", "lslr", 3)
    for algorithm in (loop, vmapped):
        algorithm.first_order, algorithm.step_weights = True, [0.2, 0.3, 0.5]
    episode = random_episode(4, tasks=3)
    for a, b in zip(grads(loop, episode)[1], grads(vmapped, episode)[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_vmapped_evaluation_scores_equal_the_loop():
    loop, vmapped = loop_and_vmap("maml", "meta_sgd", 1)
    spec = get_dataset("sinusoid")
    kwargs = dict(shots=5, test_shots=20, tasks=30, steps=(0, 1, 4), batch_size=8)
    a, b = evaluate(loop, spec, **kwargs), evaluate(vmapped, spec, **kwargs)
    for steps in (0, 1, 4):
        assert a.scores[steps].shape == (30,)
        torch.testing.assert_close(torch.tensor(a.scores[steps]), torch.tensor(b.scores[steps]),
                                   rtol=1e-5, atol=1e-7)  # float32 model, different op order


class LayerNormNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1))


class BatchNormNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1))


class CustomForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


class ItemRule(UpdateRule):
    """SGD whose step size is read with ``.item()``: fine in a loop, refused by vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(-2.0))

    def update(self, grads, state, params, step):
        scale = torch.exp(self.log_lr) * (1.0 if grads[0].abs().max().item() < 1e6 else 0.0)
        return [None if g is None else -scale * g for g in grads], state


@pytest.mark.parametrize("model,optimizer,reason", [
    (LayerNormNet, "sgd", "its LayerNorm layers are not proven right under torch.func.vmap"),
    (BatchNormNet, "sgd", "its BatchNorm1d layers are not proven right"),
    (lambda: CustomForward(nn.Linear(1, 1)), "sgd", "its CustomForward layers"),
    (lambda: MLP(1, 1, (3,)), "adam", "the inner optimizer 'adam' has no functional form"),
    (lambda: MLP(1, 1, (3,)), ItemRule(), "the inner rule ItemRule cannot run under torch.func.vmap"),
])
def test_unproven_models_and_rules_loop_with_a_warning(model, optimizer, reason):
    net = model()
    inner = InnerLoop(optimizer, 0.1, 1)
    assert reason in vmap_obstacle(net, inner)
    with pytest.warns(UserWarning, match="running the tasks of a meta-batch one by one") as caught:
        algorithm = build_algorithm("maml", net, inner, F.mse_loss, "auto")
    assert not algorithm.vectorized
    assert len(caught) == 1 and reason in str(caught[0].message)
    with pytest.raises(DiffoptError, match="cannot vectorize the meta-batch: .*--vectorize auto"):
        build_algorithm("maml", net, inner, F.mse_loss, "always")


def test_a_rule_vmap_refuses_falls_back_to_the_loop_and_its_gradient_is_right():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="ItemRule cannot run under torch.func.vmap"):
        algorithm = build_algorithm("maml", MLP(1, 1, (4,), activation="tanh").double(),
                                    InnerLoop(ItemRule().double(), 0.1, 2), F.mse_loss, "auto")
    assert not algorithm.vectorized
    assert check_meta_gradient(algorithm, random_episode(0)).max_rel_error < 1e-5


def test_buffers_block_vmap():
    net = MLP(1, 1, (3,))
    net.register_buffer("count", torch.zeros(()))
    assert vmap_obstacle(net, InnerLoop("sgd")) == "the model keeps buffers (e.g. running statistics)"


def test_layernorm_model_falls_back_and_its_gradient_is_right():
    """The fallback is exact where vmap is not trusted."""
    from diffopt.gradcheck import check_meta_gradient

    torch.manual_seed(0)
    algorithm = build_algorithm("maml", LayerNormNet().double(), InnerLoop("sgd", 0.1, 2),
                                F.mse_loss, "auto")
    assert not algorithm.vectorized
    assert check_meta_gradient(algorithm, random_episode(0)).max_rel_error < 1e-5


def test_plain_mlps_vectorize_by_default():
    assert small_algorithm(vectorize="auto").vectorized
    assert not small_algorithm(vectorize="never").vectorized
    with pytest.raises(DiffoptError, match="vectorize must be one of auto, always, never"):
        small_algorithm(vectorize="sometimes")


def cbfinn_conv4(name: str, steps: int, vectorize: str, seed: int = 0, params: str = "weights"):
    """cbfinn/maml's Omniglot model at toy size (TF batch norm, averaged last map), float64;
    ``params="all"``: the inner loop adapts batch norm's shift too (batched under vmap)."""
    torch.manual_seed(seed)
    model = initialize(Conv4(1, 3, 4, 8, norm="batch_shift", norm_eps=1e-3, head="mean"), "glorot").double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ShiftBatchNorm):
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    inner = InnerLoop("sgd", 0.1, steps, loss_reduction="class_sum", params=params)
    return build_algorithm(name, model, inner, F.cross_entropy, vectorize)


def image_tasks(seed: int, tasks: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(tasks, 4)
    return Episode(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("params", ["weights", "all"])
def test_cbfinn_conv4_is_vmapped_and_equals_the_loop(name, steps, params):
    vmapped = cbfinn_conv4(name, steps, "auto", params=params)
    loop = cbfinn_conv4(name, steps, "never", params=params)
    assert vmapped.vectorized and vmap_obstacle(vmapped.model, vmapped.inner) is None
    episode = image_tasks(steps)
    loop_metrics, loop_grads = grads(loop, episode)
    vmap_metrics, vmap_grads = grads(vmapped, episode)
    assert loop_metrics["loss"] == pytest.approx(vmap_metrics["loss"], rel=1e-10)
    for a, b in zip(loop_grads, vmap_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@settings(max_examples=3)  # about 20 s an example: every weight of a conv net, two differences each
@given(steps=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_vmapped_cbfinn_conv4_meta_gradient_matches_finite_differences(steps, seed):
    algorithm = cbfinn_conv4("maml", steps, "always", seed, params="all")
    result = check_meta_gradient(algorithm, image_tasks(seed), eps=(1e-6, 1e-7))
    assert result.max_rel_error < 1e-5, result.per_parameter


def test_input_norm_conv4_is_vmapped_and_equals_the_loop():
    """MAML++'s Mini-ImageNet input standardisation (``--input_norm imagenet``) under vmap."""
    def algorithm(vectorize: str):
        torch.manual_seed(0)
        model = initialize(Conv4(3, 3, 4, 16, pool=True, norm="batch_shift", input_norm="imagenet"),
                           "glorot").double()
        return build_algorithm("maml", model, InnerLoop("sgd", 0.1, 2), F.cross_entropy, vectorize)

    vmapped, loop = algorithm("always"), algorithm("never")
    assert isinstance(vmapped.model[0], InputNorm) and vmap_obstacle(vmapped.model, vmapped.inner) is None
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 12, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(3, 4)
    episode = Episode(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])
    loop_metrics, loop_grads = grads(loop, episode)
    vmap_metrics, vmap_grads = grads(vmapped, episode)
    assert loop_metrics["loss"] == pytest.approx(vmap_metrics["loss"], rel=1e-10)
    for a, b in zip(loop_grads, vmap_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
        standardised = (x[0, :2] - mean) / std
        torch.testing.assert_close(vmapped.model[0](x[0, :2]), standardised)


def conv4_maml(rule: str, steps: int, norm: str, **inner) -> object:
    """MAML on a toy conv-4 with ``norm`` (affine batch norm: a loop over tasks), float64."""
    torch.manual_seed(1)
    model = Conv4(1, 3, 4, 8, norm=norm, steps=steps).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight" in name and p.dim() <= 2 and not name.endswith(f"{len(model) - 1}.weight"):
                p.add_(0.2 * torch.randn_like(p))  # norm scales away from 1
    return build_algorithm("maml", model, InnerLoop(rule, 0.1, steps, model=model, **inner), F.cross_entropy,
                           "never")


@pytest.mark.parametrize("rule,steps,norm,inner,mode", [
    ("sgd", 1, "batch", {}, None),
    ("sgd", 3, "batch", {"params": "weights"}, None),
    ("lslr", 2, "per_step_batch", {}, None),
    ("lslr", 3, "per_step_batch", {}, "mamlpp"),
    ("meta_sgd", 3, "batch", {"backprop_steps": 1}, None),
])
def test_functional_loop_equals_higher(rule, steps, norm, inner, mode, monkeypatch):
    """The loop over tasks without higher (``loops_functionally``) against the loop through
    higher: affine and per-step batch norm, learned rules, MAML++'s multi-step loss and first-order
    mode, truncated backpropagation (constant inner gradients)."""
    import diffopt.algorithms.maml as maml_module

    algorithm = conv4_maml(rule, steps, norm, **inner)
    episode = image_tasks(steps)
    orders = [False, True] if mode == "mamlpp" else [False]  # first order: learned steps' gradients
    results = {}
    for path in ("functional", "higher"):
        if path == "higher":
            monkeypatch.setattr(maml_module, "loops_functionally", lambda *args: False)
        assert algorithm.functional_loop == (path == "functional") and not algorithm.vectorized
        for first_order in orders:
            if mode == "mamlpp":
                algorithm.first_order, algorithm.step_weights = first_order, [0.2, 0.3, 0.5]
            results[path, first_order] = grads(algorithm, episode)
    for first_order in orders:
        (higher_metrics, higher_grads), (functional_metrics, functional_grads) = (
            results["higher", first_order], results["functional", first_order])
        assert functional_metrics["loss"] == pytest.approx(higher_metrics["loss"], rel=1e-12)
        for a, b in zip(higher_grads, functional_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        assert all(g.abs().max() > 0 for g in functional_grads[-2:])


@pytest.mark.parametrize("rule,steps,inner,mode", [
    ("sgd", 1, {}, None),
    ("sgd", 3, {"params": "weights"}, "mamlpp"),
    ("lslr", 2, {}, "mamlpp"),
    ("meta_sgd", 3, {"backprop_steps": 1}, None),
])
def test_support_side_under_vmap_equals_the_loop(rule, steps, inner, mode):
    """Affine batch norm: every task's inner loop at once under vmap, each query side alone
    (``over_support``), against the functional loop over tasks; learned rules, MAML++'s multi-step
    loss and first-order mode, truncated backpropagation."""
    algorithm = conv4_maml(rule, steps, "batch", **inner)
    batched = build_algorithm("maml", algorithm.model, algorithm.inner, F.cross_entropy, "auto")
    assert batched.support_vmapped and not algorithm.support_vmapped and algorithm.functional_loop
    episode = image_tasks(steps)
    for first_order in [False, True] if mode == "mamlpp" else [False]:
        for learner in (algorithm, batched):
            if mode == "mamlpp":
                learner.first_order, learner.step_weights = first_order, [0.2, 0.3, 0.5][-steps:]
        loop_metrics, loop_grads = grads(algorithm, episode)
        metrics, batched_grads = grads(batched, episode)
        assert metrics["loss"] == pytest.approx(loop_metrics["loss"], rel=1e-12)
        for a, b in zip(loop_grads, batched_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
        assert all(g.abs().max() > 0 for g in batched_grads[-2:])


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_support_side_in_groups_equals_the_loop(tasks):
    """``support_vmap_tasks``: groups of 2 over 3 tasks (the last group short), all 3 in one
    group, and a group larger than the meta-batch: each the loop's meta-gradient; 1 loops."""
    algorithm = conv4_maml("lslr", 2, "batch")
    grouped = build_algorithm("maml", algorithm.model, algorithm.inner, F.cross_entropy, "auto",
                              support_vmap_tasks=tasks)
    assert grouped.support_vmapped
    episode = image_tasks(5)
    loop_metrics, loop_grads = grads(algorithm, episode)
    metrics, grouped_grads = grads(grouped, episode)
    assert metrics["loss"] == pytest.approx(loop_metrics["loss"], rel=1e-12)
    for a, b in zip(loop_grads, grouped_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    assert not build_algorithm("maml", algorithm.model, algorithm.inner, F.cross_entropy, "auto",
                               support_vmap_tasks=1).support_vmapped


def test_support_side_is_vmapped_by_default_only_for_small_support_sets(monkeypatch):
    """``support_vmap_tasks=0`` vmaps the support side where a task's support set has at most
    ``SMALL_SUPPORT`` elements, else loops over whole tasks; a group size vmaps it regardless."""
    algorithm = conv4_maml("sgd", 1, "batch")
    episode = image_tasks(6)
    calls = []
    monkeypatch.setattr(MAML, "meta_gradient_over_support",
                        lambda self, episode: calls.append(len(episode)) or torch.zeros(()))
    for option, limit, vmapped in [(0, episode.support_x[0].numel(), True),
                                   (0, episode.support_x[0].numel() - 1, False), (2, 0, True)]:
        monkeypatch.setattr(vectorize, "SMALL_SUPPORT", limit)
        learner = build_algorithm("maml", algorithm.model, algorithm.inner, F.cross_entropy, "auto",
                                  support_vmap_tasks=option)
        calls.clear()
        learner.meta_gradient(episode)
        assert calls == ([3] if vmapped else []), (option, limit)
        assert learner.meta_batch_path(episode) == ("inner loops under vmap, query sides one task at a time"
                                                    if vmapped else "loop over tasks")


def test_support_groups_fit_a_share_of_the_free_memory(monkeypatch):
    """By default the support side's groups hold at most ``SUPPORT_MEMORY_SHARE`` of the free
    memory, one task's graph measured: room for 2 of 3 tasks gives groups of 2 (the loop's
    meta-gradient all the same), for none whole tasks, unknown free memory all 3."""
    algorithm = conv4_maml("sgd", 2, "batch")
    episode = image_tasks(7)
    params = list(algorithm.parameters())

    def adapt(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        unroll = algorithm.inner.unroll(algorithm.model, F.cross_entropy, x, y, functional=True)
        return [list(fmodel.parameters()) for fmodel in unroll][-1]

    one_task = graph_bytes(torch.func.vmap(adapt)(episode.support_x[:1], episode.support_y[:1]), params)
    assert one_task > 0
    _, loop_grads = grads(algorithm, episode)
    for free, group in [(2.5 * one_task / vectorize.SUPPORT_MEMORY_SHARE, 2),
                        (0.5 * one_task / vectorize.SUPPORT_MEMORY_SHARE, 1), (None, 3)]:
        monkeypatch.setattr(vectorize, "available_bytes", lambda device, free=free: free)
        learner = build_algorithm("maml", algorithm.model, algorithm.inner, F.cross_entropy, "auto")
        assert learner.support_group(episode) == group, free
        assert learner.vmaps_support(episode) == (group > 1)
        _, learner_grads = grads(learner, episode)
        for a, b in zip(loop_grads, learner_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


def test_boil_support_side_under_vmap_equals_its_loop():
    """BOIL (the body adapted, the head not) takes MAML's support-side path: the same meta-gradient."""
    torch.manual_seed(2)
    model = Conv4(1, 3, 4, 8, norm="batch").double()
    episode = image_tasks(8)
    results = []
    for mode in ("auto", "never"):
        boil = build_algorithm("boil", model, InnerLoop("sgd", 0.1, 2, model=model), F.cross_entropy, mode)
        assert boil.vmaps_support(episode) == (mode == "auto")
        results.append(grads(boil, episode))
    (metrics, batched), (loop_metrics, loop) = results
    assert metrics["loss"] == pytest.approx(loop_metrics["loss"], rel=1e-12)
    for a, b in zip(loop, batched, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    assert batched[-2].abs().max() > 0  # the head gets its meta-gradient through the query side


def test_support_side_is_batched_only_where_it_applies():
    def batched(norm="batch", algorithm="maml", task_threads=1, vectorize="auto", **inner):
        model = Conv4(1, 3, 4, 8, norm=norm)
        return build_algorithm(algorithm, model, InnerLoop("sgd", 0.1, 2, model=model, **inner),
                               F.cross_entropy, vectorize, task_threads).support_vmapped

    assert batched() and batched(algorithm="boil")
    assert not batched(norm="batch_shift")  # vmapped whole
    assert not batched(norm="per_step_batch")  # running statistics
    assert not batched(algorithm="anil")  # its features computed once
    assert not batched(task_threads=2) and not batched(vectorize="never") and not batched(checkpoint=2)


def test_loops_functionally_only_where_it_applies():
    model = Conv4(1, 3, 4, 8)
    assert loops_functionally(InnerLoop("sgd", 0.1, 2), 1, model)
    assert loops_functionally(InnerLoop("lslr", 0.1, 2, model=model), 1, model)
    assert not loops_functionally(InnerLoop("adam", 0.1, 2), 1, model)  # no functional form: higher
    assert not loops_functionally(InnerLoop("sgd", 0.1, 4, checkpoint=2), 1, model)
    assert not loops_functionally(InnerLoop("sgd", 0.1, 2), 2, Conv4(1, 3, 4, 8, norm="batch_shift"))
