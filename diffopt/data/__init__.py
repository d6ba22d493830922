"""Datasets: torchmeta episodic loaders behind one registry, and the episode they produce.

Every dataset gives a loader of torchmeta batches for a split ('train', 'val', 'test') whose
task stream is fixed by a seed, the task loss, and the per-task score that evaluation reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffopt.data.episode import Episode, Task
from diffopt.data.image_options import CLASS_SPLITS, OMNIGLOT_IMAGES
from diffopt.data.sinusoid import sinusoid_loader
from diffopt.errors import DiffoptError, as_typed, unknown_name
from diffopt.options import Option, check_int

__all__ = ["DATASETS", "DATA_OPTIONS", "DatasetSpec", "Episode", "Task", "get_dataset", "split_seed"]

SPLITS = ("train", "val", "test")


def split_seed(seed: int, split: str) -> int:
    """An independent 32-bit seed per (seed, split): the training stream never repeats test tasks."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def mse_per_task(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per task: [B, N, d] x [B, N, d] -> [B] (or [N, d] -> [])."""
    return (prediction - target).pow(2).flatten(-2).mean(-1)


def accuracy_per_task(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction classified right per task: [B, N, C] x [B, N] -> [B] (or [N, C] x [N] -> [])."""
    return (logits.argmax(-1) == labels).to(logits.dtype).mean(-1)


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of diffopt needs to know about a dataset."""

    name: str
    make_loader: Callable[..., Any]
    """(split, shots, test_shots, batch_size, num_tasks, seed, num_workers, root, start[, ways]) ->
    loader of torchmeta batches of tasks start .. num_tasks - 1."""
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """Differentiable task loss: (prediction [N, ...], target [N, ...]) -> scalar."""
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """Per-task evaluation score: (prediction [B, N, ...], target [B, N, ...]) -> [B]."""
    metric: str
    lower_is_better: bool
    classification: bool
    eval_test_shots: int = 15
    """Query examples (per class) scored per evaluation task by default."""
    examples_per_class: int | None = None
    """Examples of each class (classification): a task's support and query shots must fit."""
    model_io: dict[str, Any] = field(default_factory=dict)
    """Model keyword arguments fixed by the data (input sizes; the output size too for regression,
    while classifiers output ``ways`` logits)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Training options this dataset's literature uses (overridden by explicit flags)."""
    algorithm_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-algorithm overrides of ``defaults`` (e.g. Reptile's inner loop and outer schedule)."""
    rotated_classes: bool = False
    """Whether the classes include rotated copies (Omniglot, as MAML), which ``loader`` can leave out."""
    image_options: tuple[str, ...] = ("bilinear",)
    """The preprocessings ``loader(images=...)`` offers (Omniglot: ``OMNIGLOT_IMAGES``)."""
    class_splits: tuple[str, ...] = ()
    """The class splits ``loader(class_split=...)`` offers besides its own (Omniglot: ``CLASS_SPLITS``)."""

    def data_options(self, *, rotations: bool = True, images: str = "bilinear",
                     class_split: str | None = None) -> dict[str, Any]:
        """The keyword arguments ``make_loader`` takes for these data options (none where they are
        the defaults); DiffoptError for one this dataset does not offer."""
        options: dict[str, Any] = {}
        if not rotations:
            if not self.rotated_classes:
                raise DiffoptError(f"--rotations False applies to omniglot; {self.name} has no rotated "
                                   "classes")
            options["rotations"] = False
        if images != "bilinear":
            if images not in self.image_options:
                raise unknown_name(f"{self.name} image preprocessing", images, self.image_options)
            options["images"] = images
        if class_split is not None:
            if class_split not in self.class_splits:
                raise unknown_name(f"{self.name} class split", class_split, self.class_splits or ("none",))
            options["class_split"] = class_split
        return options

    def check_options(self, *, data_root: str, shots: int, test_shots: int, train_shots: int | None,
                      ways: int | None, meta_batch_size: int, num_workers: int, images: str,
                      class_split: str | None) -> None:
        """DiffoptError naming the first of the data options (``DATA_OPTIONS`` but ``dataset``)
        this dataset cannot serve."""
        if not isinstance(data_root, str):
            raise DiffoptError(f"--data_root must be a folder name; got {as_typed(data_root)}")
        self.data_options(images=images, class_split=class_split)
        for name, value, minimum in [("shots", shots, 1), ("test_shots", test_shots, 1),
                                     ("meta_batch_size", meta_batch_size, 1),
                                     ("num_workers", num_workers, 0)]:
            check_int(name, value, minimum)
        if ways is not None or self.classification:
            check_int("ways", ways, 2)
            if not self.classification:
                raise DiffoptError(f"--ways applies to classification datasets; {self.name} is regression")
        if train_shots is not None:
            check_int("train_shots", train_shots, 1)
        support = train_shots or shots
        if self.examples_per_class is not None and support + test_shots > self.examples_per_class:
            raise DiffoptError(
                f"{self.name} has {self.examples_per_class} examples per class; support + query shots "
                f"per class while training ({support} + {test_shots}) must not exceed it: lower "
                "--shots, --train_shots or --test_shots")

    def loader(
        self, split: str, *, seed: int, shots: int, test_shots: int, batch_size: int,
        num_tasks: int, num_workers: int = 0, ways: int | None = None, root: str = "data",
        start: int = 0, rotations: bool = True, images: str = "bilinear", class_split: str | None = None,
    ):
        """Loader over tasks ``start`` .. ``num_tasks - 1`` of ``split``, in an order fixed by
        ``seed``; image datasets are read from ``root`` (as ``diffopt data prepare`` wrote it).
        ``rotations=False``: the characters alone, not their rotated copies (Omniglot; Reptile's
        and MAML++'s test classes). ``images``: the image preprocessing (``image_options``);
        ``class_split``: one of ``class_splits`` (None: the dataset's own)."""
        kwargs = dict(ways=ways) if self.classification else {}
        kwargs.update(self.data_options(rotations=rotations, images=images, class_split=class_split))
        return self.make_loader(
            split=split, shots=shots, test_shots=test_shots, batch_size=batch_size,
            num_tasks=num_tasks, seed=split_seed(seed, split), num_workers=num_workers, root=root,
            start=start, **kwargs,
        )


def image_loader(name: str, **kwargs: Any):
    """``diffopt.data.images.torchmeta_loader(name, ...)``, imported when first called: torchmeta's
    image datasets import torchvision (see ``image_options``)."""
    from diffopt.data.images import torchmeta_loader

    return torchmeta_loader(name, **kwargs)


def _image_classification(**fields: Any) -> DatasetSpec:
    """A few-shot image classification dataset: cross-entropy, scored by accuracy."""
    return DatasetSpec(loss=F.cross_entropy, score=accuracy_per_task, metric="accuracy",
                       lower_is_better=False, classification=True, **fields)


MAML_IMAGES: dict[str, Any] = dict(inner_loss_reduction="class_sum", norm="batch_shift", norm_eps=1e-3,
                                   inner_params="weights")
"""cbfinn/maml on images (docs/protocols.md): the inner loss is the cross-entropy summed over
examples over the shots, so the inner lr 0.4 (Omniglot) / 0.01 (Mini-ImageNet) is a step on
ways x the mean loss; TF's batch norm, a shift and no scale, epsilon 1e-3, its shift learned by
the outer loop only (the inner loop adapts the convolution and linear weights)."""

MAML_OMNIGLOT: dict[str, Any] = dict(MAML_IMAGES, test_shots=None, head="mean", init="glorot_normal_output")
"""cbfinn/maml on Omniglot: as many query examples per class as support ones while training
(main.py: DataGenerator(update_batch_size * 2)); the output layer reads the last map averaged
over positions, initialised N(0, 1)."""

IMAML_OMNIGLOT: dict[str, Any] = dict(
    norm="batch", norm_eps=1e-5, head="flatten", test_shots=None, inner_lr=0.1, inner_steps=16,
    inner_proximal=2.0, cg_steps=5, meta_batch_size=32, meta_lr=1e-3)
"""imaml_dev's Omniglot 5-way 1-shot run (examples/README.md; docs/protocols.md section 6): batch
norm with a scale, batch statistics, eps 1e-5; the last map flattened (2x2x64); as many query
images per class as support ones; 16 inner SGD steps of 0.1 on the mean loss, lambda 2, 5 CG
iterations; meta-batch 32, Adam 1e-3."""


def cbfinn_value_clip(values: dict[str, Any]) -> float:
    """cbfinn/maml clamps Mini-ImageNet's meta-gradient elements to [-10, 10] (maml.py:147-148), the
    gradient of a meta-loss summed over a task's queries and divided by the shots (maml.py:136):
    ways x test_shots / shots times diffopt's mean query loss, so its 10 is this here."""
    return 10.0 * values["shots"] / (values["ways"] * values["test_shots"])


MAML_MINIIMAGENET: dict[str, Any] = dict(MAML_IMAGES, max_grad_value=cbfinn_value_clip)
"""cbfinn/maml on Mini-ImageNet: its images' settings and the clamped meta-gradient."""

REPTILE_IMAGES: dict[str, Any] = dict(
    inner_optimizer="adam_beta1_0", inner_lr=0.001, inner_batch_size=10, inner_state="persist",
    inner_loss_reduction="sum", norm_eps=1e-3,
    meta_batch_size=5, outer_optimizer="sgd", meta_lr=1.0, meta_lr_final=0.0, validation_steps=50)
"""Reptile's image protocol (Nichol et al. 2018, Omniglot and Mini-ImageNet alike): inner Adam
with beta1 = 0, lr 0.001, on the summed loss of shuffled mini-batches of 10, its state carried
from task to task; batch norm eps 1e-3 (TF's); meta-batch 5; outer step 1 annealed to 0; 50 inner
steps at evaluation (docs/protocols.md)."""


DATASETS: dict[str, DatasetSpec] = {
    "sinusoid": DatasetSpec(
        name="sinusoid",
        make_loader=sinusoid_loader,
        loss=F.mse_loss,
        score=mse_per_task,
        metric="mse",
        lower_is_better=True,
        classification=False,
        eval_test_shots=100,
        model_io=dict(in_features=1, out_features=1),
        # Finn et al. 2017, section 5.1: 1-40-40-1 ReLU MLP, inner lr 0.01, meta-batch 25, Adam 1e-3.
        defaults=dict(model="mlp", hidden=(40, 40), activation="relu", meta_batch_size=25),
        # Nichol et al. 2018 (sine demo): several inner SGD steps, outer step annealed linearly to
        # 0. Inner lr 0.01 (theirs: 0.02), MAML's, so all algorithms adapt alike at evaluation;
        # 0.02 diverged on 1 of 500 K=5 test tasks after 10 steps (MSE ~1e7).
        algorithm_defaults=dict(
            reptile=dict(inner_steps=5, inner_lr=0.01, outer_optimizer="sgd",
                         meta_lr=1.0, meta_lr_final=0.0),
            # No paper runs iMAML on sinusoid; diffopt's configuration that solves its inner
            # problem (RESULTS.md, "Sinusoid: ANIL, BOIL and iMAML"): lambda 100 = 1 / MAML's inner
            # lr, 3 backtracking Gauss-Newton steps; gradient steps leave it unsolved.
            imaml=dict(inner_solver="gauss_newton", inner_steps=3, inner_lr=1.0, inner_proximal=100.0,
                       inner_backtrack=True),
        ),
    ),
    "omniglot": _image_classification(
        name="omniglot",
        make_loader=partial(image_loader, "omniglot"),
        examples_per_class=20,
        model_io=dict(in_channels=1, image_size=28, pool=False),
        rotated_classes=True,
        image_options=OMNIGLOT_IMAGES,
        class_splits=CLASS_SPLITS,
        # Finn et al. 2017, section 5.2 / appendix A.1: conv-4 with 64 strided filters and batch
        # norm, 5-way, meta-batch 32, inner lr 0.4, one inner step while meta-training, Adam 1e-3.
        defaults=dict(model="conv4", hidden=(64,), activation="relu", norm="batch", init="glorot",
                      ways=5, shots=1, test_shots=15, meta_batch_size=32, inner_lr=0.4, inner_steps=1),
        # Nichol et al. 2018, Omniglot 5-way: 10 examples per class per task while meta-training
        # (here 5 support + 5 query, as Reptile trains on both), 5 inner steps.
        algorithm_defaults=dict(maml=MAML_OMNIGLOT, fomaml=MAML_OMNIGLOT, imaml=IMAML_OMNIGLOT,
                                reptile=dict(REPTILE_IMAGES, train_shots=5, test_shots=5, inner_steps=5)),
    ),
    "miniimagenet": _image_classification(
        name="miniimagenet",
        make_loader=partial(image_loader, "miniimagenet"),
        examples_per_class=600,
        model_io=dict(in_channels=3, image_size=84, pool=True),
        # Finn et al. 2017, appendix A.1: conv-4 with 32 filters, 2x2 max-pooling and batch norm,
        # 5-way, meta-batch 4 (1-shot), inner lr 0.01, 5 inner steps while meta-training, Adam 1e-3.
        defaults=dict(model="conv4", hidden=(32,), activation="relu", norm="batch", init="glorot",
                      ways=5, shots=1, test_shots=15, meta_batch_size=4, inner_lr=0.01, inner_steps=5),
        # Nichol et al. 2018, Mini-ImageNet 5-way: 15 examples per class per task while
        # meta-training (here 10 support + 5 query), 8 inner steps; 'same' max-pooling (6x6 map).
        algorithm_defaults=dict(maml=MAML_MINIIMAGENET, fomaml=MAML_MINIIMAGENET,
                                reptile=dict(REPTILE_IMAGES, train_shots=10, test_shots=5, inner_steps=8,
                                             pool_padding="same")),
    ),
}


DATA_OPTIONS: dict[str, Option] = {
    "dataset": Option(str, "sinusoid", f"dataset: {', '.join(DATASETS)}"),
    "data_root": Option(str, "data", "folder holding prepared image datasets (`diffopt data prepare`)"),
    "class_split": Option(
        str | None, None, "Omniglot character split: vinyals (by alphabet, 1028 / 172 / 423; "
        "torchmeta's, the default), vinyals_trainval (the same, its validation characters trained on: "
        "1200 / 423, no validation) or reptile (supervised-reptile's seeded shuffle, 1200 / 423, no "
        "validation)"),
    "images": Option(
        str, "bilinear", "Omniglot image preprocessing: bilinear (torchmeta's antialiased resize, grey "
        "strokes 1: one pipeline for every algorithm), nearest (binary, strokes 1: cbfinn/maml) or "
        "nearest_strokes_0 (binary, strokes 0: supervised-reptile, MAML++)"),
    "shots": Option(int, 10, "support examples per task (K); per class for classification"),
    "test_shots": Option(int | None, None, "query examples per task during meta-training (default: shots)"),
    "train_shots": Option(
        int | None, None, "support examples per task while meta-training, if more than at test "
        "(Reptile); default: shots"),
    "ways": Option(int | None, None, "classes per task (classification datasets only)"),
    "meta_batch_size": Option(int, 25, "tasks per meta-iteration"),
    "num_workers": Option(int, 0, "data-loader worker processes"),
}
"""The run's task-stream options, which ``DatasetSpec.loader`` takes and ``check_options`` checks;
the dataset's protocol (``defaults``, ``algorithm_defaults``) sets them before the user's flags."""


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset called ``name``."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise unknown_name("dataset", name, DATASETS) from None
