"""ResNet-12 (``--model resnet12``): its shapes and widths, its forward written out by hand, its
MAML meta-gradient against finite differences, why it loops over tasks, its options, and a
meta-training run on the real Omniglot data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffopt.algorithms import build_algorithm
from diffopt.cli import main
from diffopt.config import resolve_config, resolve_saved_config
from diffopt.data import Episode
from diffopt.errors import DiffoptError
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.models import PerStepBatchNorm, ResNet12, build_model
from diffopt.models.resnet12 import ResidualBlock, resnet12_widths
from diffopt.runfolder import load_checkpoint
from diffopt.train import build
from diffopt.vectorize import vmap_obstacle

TINY = (2, 3, 4, 5)


def image_episode(shape: tuple[int, ...], ways: int = 3, tasks: int = 2, shots: int = 2,
                  dtype: torch.dtype = torch.float32) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat(tasks, shots)  # [tasks, shots * ways]
    x = torch.rand(tasks, shots * ways, *shape, generator=g, dtype=dtype)
    half = ways * shots // 2
    return Episode(x[:, :half], labels[:, :half], x[:, half:], labels[:, half:])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 84, 84)], ids=["omniglot", "miniimagenet"])
@pytest.mark.parametrize("head, pool_padding", [("mean", "valid"), ("flatten", "valid"), ("flatten", "same")])
def test_output_shape_and_feature_size(shape, head, pool_padding):
    channels, size, _ = shape
    model = build_model("resnet12", in_channels=channels, image_size=size, out_features=5, hidden=TINY,
                        head=head, pool_padding=pool_padding, pool=False)
    assert model(torch.rand(3, *shape)).shape == (3, 5)
    maps = {(28, "valid"): 1, (28, "same"): 2, (84, "valid"): 5, (84, "same"): 6}  # after 4 poolings
    positions = 1 if head == "mean" else maps[size, pool_padding] ** 2
    assert model[-1].in_features == TINY[-1] * positions
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert [b.body[0].out_channels for b in blocks] == list(TINY)
    assert all(sum(isinstance(m, torch.nn.Conv2d) for m in b.modules()) == 4 for b in blocks)


def test_widths_and_parameter_count_at_the_defaults():
    assert resnet12_widths(64) == resnet12_widths((64,)) == [64, 160, 320, 640]  # Lee et al.'s
    assert resnet12_widths(3) == [3, 8, 15, 30] and resnet12_widths(TINY) == list(TINY)
    with pytest.raises(ValueError, match="one width or four"):
        resnet12_widths((2, 3))
    counts = {channels: sum(p.numel() for p in ResNet12(channels, 5).parameters()) for channels in (1, 3)}
    assert counts == {3: 12_427_525, 1: 12_426_245}  # 5-way Mini-ImageNet, Omniglot: ~12.4M


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_forward_is_the_residual_block_written_out(norm):
    """Each block: conv-norm-act, conv-norm-act, conv-norm, plus the 1x1 conv-norm shortcut, the
    activation (slope 0.1) of the sum, then 2x2 max-pooling; global average pooling, a linear layer."""
    torch.manual_seed(0)
    model = ResNet12(1, 3, hidden=TINY, image_size=20, norm=norm).double()
    x = torch.rand(4, 1, 20, 20, dtype=torch.float64)

    def conv_norm(x, conv, bn):
        y = F.conv2d(x, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2)
        if norm == "none":
            return y
        return F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)

    h = x
    for block in [m for m in model if isinstance(m, ResidualBlock)]:
        c1, n1, _, c2, n2, _, c3, n3 = block.body
        y = F.leaky_relu(conv_norm(h, c1, n1), 0.1)
        y = F.leaky_relu(conv_norm(y, c2, n2), 0.1)
        y = conv_norm(y, c3, n3) + conv_norm(h, *block.shortcut)
        h = F.max_pool2d(F.leaky_relu(y, 0.1), 2)
    expected = F.linear(h.mean((2, 3)), model[-1].weight, model[-1].bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_matches_finite_differences(steps):
    """Second-order MAML through a ResNet-12 of width 1 (150 parameters: each costs four meta-losses
    here), float64, against central differences; every tensor, the shortcuts' included, has a
    gradient. Batch norm over a few images curves the meta-loss sharply and the leaky ReLUs and
    max-pooling have kinks, so each tensor takes the better of eps 1e-6 and 1e-7 (as
    tests/test_norm.py): at 1e-6 alone a two-step check of widths 1,1,2,2 erred by 8.7e-3."""
    torch.manual_seed(0)
    model = ResNet12(1, 3, hidden=(1, 1, 1, 1), image_size=16).double()  # batch norm, batch statistics
    inner = InnerLoop("sgd", 0.1, steps, model=model)
    algorithm = build_algorithm("maml", model, inner, F.cross_entropy, "never")
    episode = image_episode((1, 16, 16), tasks=1, shots=4, dtype=torch.float64)
    result = check_meta_gradient(algorithm, episode, eps=(1e-6, 1e-7))
    assert result.max_rel_error < 1e-5, result.per_parameter
    scales = {name: check.grad_scale for name, check in result.per_parameter.items()}
    assert all(scale > 1e-8 for scale in scales.values()), scales
    assert any(".shortcut." in name for name in scales)


@pytest.mark.parametrize("norm", ["batch", "batch_shift", "per_step_batch", "none"])
def test_every_norm_gives_every_parameter_a_meta_gradient(norm):
    """One second-order MAML meta-gradient (two inner steps) with each norm: finite, and nonzero
    for every tensor (a per-step norm's rows 0 and 1: the support forwards of the two steps)."""
    torch.manual_seed(0)
    model = ResNet12(1, 3, hidden=TINY, image_size=16, norm=norm, steps=2)
    algorithm = build_algorithm("maml", model, InnerLoop("sgd", 0.1, 2, model=model), F.cross_entropy,
                                "never")
    metrics = algorithm.meta_gradient(image_episode((1, 16, 16), shots=4))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    per_step = {id(p) for m in model.modules() if isinstance(m, PerStepBatchNorm) for p in m.parameters()}
    assert bool(per_step) == (norm == "per_step_batch")
    for name, parameter in model.named_parameters():
        rows = parameter.grad[:2] if id(parameter) in per_step else parameter.grad[None]
        assert torch.isfinite(parameter.grad).all(), name
        assert all(row.abs().sum() > 0 for row in rows), name


@pytest.mark.parametrize("norm, reason", [
    ("batch", "BatchStatNorm2d"), ("per_step_batch", "PerStepBatchNorm"),
    ("batch_shift", "ResidualBlock"), ("none", "ResidualBlock")])
def test_vmap_obstacle_names_the_reason(norm, reason):
    """The same rules as every model: batch norm (and a block's own ``forward``) is not on the
    vmap allow-list, so the meta-batch loops over tasks, and ``--vectorize always`` says why."""
    model = ResNet12(1, 3, hidden=TINY, image_size=16, norm=norm)
    inner = InnerLoop("sgd", 0.1, 1, model=model)
    obstacle = vmap_obstacle(model, inner)
    assert obstacle is not None and reason in obstacle, obstacle
    with pytest.warns(UserWarning, match=reason):
        assert not build_algorithm("maml", model, inner, F.cross_entropy, "auto").vectorized
    with pytest.raises(DiffoptError, match=f"cannot vectorize the meta-batch: .*{reason}"):
        build_algorithm("maml", model, inner, F.cross_entropy, "always")


def test_resnet12_options_start_from_its_own_defaults():
    for algorithm in ("maml", "reptile", "imaml"):
        config = resolve_config(dataset="omniglot", model="resnet12", algorithm=algorithm)
        assert (config.hidden, config.activation, config.norm, config.norm_eps, config.head, config.init) == (
            (64,), "leaky_relu_0.1", "batch", 1e-5, "mean", "torch"), algorithm
    config = resolve_config(dataset="miniimagenet", model="resnet12", activation="relu", head="flatten",
                            hidden=(2, 3, 4, 5), input_norm="imagenet", pool_padding="same")
    assert (config.activation, config.head, config.hidden) == ("relu", "flatten", (2, 3, 4, 5))  # flags win
    assert resolve_config(dataset="omniglot").model == "conv4"  # conv-4's defaults untouched
    assert resolve_config(dataset="omniglot").activation == "relu"


@pytest.mark.parametrize("argv, fragment", [
    (["--hidden", "2,3"], "--hidden for resnet12 is one filter count or four"),
    (["--pool", "True"], "--pool takes True or False and applies to conv4"),
    (["--padding", "symmetric"], "resnet12 has no strided convolutions"),
    (["--head", "middle"], "unknown head 'middle'"),
    (["--dataset", "sinusoid"], "--model resnet12 reads images; sinusoid has none"),
])
def test_bad_resnet12_options_are_one_line_errors(argv, fragment, capsys):
    argv = ["train", "--model", "resnet12", *(["--dataset", "omniglot"] if "--dataset" not in argv else []),
            *argv, "--dry_run"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_trains_on_omniglot_end_to_end(omniglot_root, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--dataset", "omniglot", "--model", "resnet12", "--hidden", "2,2,2,2",
                 "--iterations", "2", "--meta_batch_size", "2", "--test_shots", "2",
                 "--data_root", str(omniglot_root), "--run_dir", str(run), "--progress", "False"])
    assert code == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0 < m["loss"] < 10 for m in metrics)
    payload = load_checkpoint(run)
    assert payload["config"]["model"] == "resnet12" and payload["config"]["head"] == "mean"
    state = payload["algorithm"]
    assert state["model.3.shortcut.0.weight"].shape == (2, 2, 1, 1)
    assert state["model.6.weight"].shape == (5, 2)  # 5-way, after global average pooling
    initial = build(resolve_saved_config(payload["config"])).state_dict()  # the seed's weights
    assert not torch.equal(initial["model.6.weight"], state["model.6.weight"])  # meta-steps taken
