"""Few-shot image datasets through torchmeta's helpers, gathered from uint8 images in memory.

Omniglot (Lake et al. 2015, torchmeta's ``omniglot``): 28x28 images (Resize, as MAML), classes
rotated by 90, 180 and 270 degrees as new classes (as MAML), the Vinyals et al. split of
characters into meta-train / meta-val / meta-test. Mini-ImageNet (Vinyals et al. 2016,
torchmeta's ``miniimagenet``): 84x84 RGB images, the Ravi & Larochelle 64 / 16 / 20 class split.
Both must be prepared first (``diffopt data prepare NAME``).

Task i of a stream is a function of (seed, i) alone: ``TaskSampler`` draws its classes from a
generator seeded by (seed, i), and ``TaskBatches`` seeds torchmeta's splitter and label
permutation by (seed, i). So a stream can start anywhere (resuming) or be split between processes
and still be the same tasks.

Task i is the one torchmeta's own pipeline gives (its helper dataset, ``ClassSplitter`` and
``Categorical`` labels, seeded by (seed, i): bit for bit, tested), but not built the way torchmeta
builds it, a Python object per example read and transformed every time and a collate stacking
them: ``ImageStore`` keeps each image as torchmeta reads and transforms it (uint8, up to
``PILToTensor``) once per process, ``TaskBatches`` computes a task's rows and labels with
torchmeta's draws, and a batch is one gather and one ``Decode`` (what ``ToTensor`` does).
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from diffopt.data.prepare import PREPARED_FILES, SOURCES
from diffopt.data.torchmeta_compat import load as load_torchmeta
from diffopt.errors import DiffoptError

load_torchmeta()  # before torchmeta's own imports below: its fixes (torchmeta_compat)
from torchmeta.transforms.splitters import ClassSplitter_  # noqa: E402

TORCHMETA_SPLITS = {"train": "meta_train", "val": "meta_val", "test": "meta_test"}


def task_seed(seed: int, index: int) -> int:
    """A 32-bit seed for task ``index`` of the stream ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class TaskSampler(Sampler):
    """Yields (i, classes) for i in [start, num_tasks): ``ways`` distinct classes of ``num_classes``."""

    def __init__(self, num_classes: int, ways: int, num_tasks: int, seed: int, start: int = 0) -> None:
        if ways > num_classes:
            raise DiffoptError(f"--ways {ways} is more than the {num_classes} classes of this split")
        self.num_classes, self.ways, self.num_tasks = num_classes, ways, num_tasks
        self.seed, self.start = seed, start

    def __iter__(self):
        for index in range(self.start, self.num_tasks):
            rng = np.random.default_rng(task_seed(self.seed, index))
            yield index, tuple(int(c) for c in rng.choice(self.num_classes, self.ways, replace=False))

    def __len__(self) -> int:
        return self.num_tasks - self.start


class ImageStore:
    """One split's images as uint8, each read and transformed by torchmeta once per process.

    ``classes`` is torchmeta's class dataset (rotated copies included), its ``transform`` ending
    in ``PILToTensor``. Every example of every class has a row of one uint8 tensor [examples, C,
    H, W] (rows of a class consecutive, from ``offsets``), filled as it is first drawn: a batch
    of tasks is one gather, and the memory of rows never drawn is never committed.
    """

    def __init__(self, classes) -> None:
        self.classes = classes
        self._datasets: list[Any] = [None] * len(classes)
        # a class augmentation (torchmeta's rotated copies, classes num_classes onwards) transforms
        # each image of its class: as many examples (torchmeta dataset.py:88-100)
        counts = [len(self.dataset(index)) for index in range(classes.num_classes)]
        self.offsets = np.cumsum([0] + [counts[index % len(counts)] for index in range(len(classes))])
        self.pixels: torch.Tensor | None = None
        self._read = np.zeros(self.offsets[-1], dtype=bool)

    def __len__(self) -> int:
        return len(self.classes)

    def count(self, index: int) -> int:
        """The examples of class ``index``."""
        return int(self.offsets[index + 1] - self.offsets[index])

    def dataset(self, index: int):
        """torchmeta's dataset of class ``index`` (built once: it opens the class's files)."""
        dataset = self._datasets[index]
        if dataset is None:
            dataset = self._datasets[index] = self.classes[index]
        return dataset

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 [len(rows), C, H, W]: the examples at ``rows`` (``offsets[class] + example``)."""
        if not self._read[rows].all():
            self._fill(rows)
        return self.pixels[torch.from_numpy(rows)]

    def fill(self) -> None:
        """Read every image now (Omniglot's 82k meta-training images: about 11 s, 64 MB), as a
        long run's store is after its first thousand or so meta-batches."""
        self._fill(np.flatnonzero(~self._read))

    def _fill(self, rows: np.ndarray) -> None:
        for row in np.unique(rows[~self._read[rows]]):
            index = int(np.searchsorted(self.offsets, row, side="right")) - 1
            image, _ = self.dataset(index)[int(row - self.offsets[index])]
            if image.dtype != torch.uint8:
                raise TypeError(f"ImageStore needs uint8 images (a transform ending in PILToTensor); "
                                f"got {image.dtype}")
            if self.pixels is None:
                self.pixels = torch.empty((len(self._read), *image.shape), dtype=torch.uint8)
            self.pixels[row] = image
            self._read[row] = True


_IMAGE_STORES: dict[tuple, ImageStore] = {}
"""(dataset, root, split, rotations, images, class split) -> its ``ImageStore``, shared by the
loaders of a process (training, validation and evaluation read the same images)."""


class Decode:
    """uint8 images -> float in [0, 1] as ``ToTensor`` gives them (``x / 255``, element by element,
    so a batch is decoded bit for bit as each image would be); ``invert``: 1 - that."""

    def __init__(self, invert: bool = False) -> None:
        self.invert = invert

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.to(torch.get_default_dtype()).div(255)
        return 1 - images if self.invert else images


def _reseeded(generator: np.random.RandomState | None, seed) -> np.random.RandomState:
    """The state of ``np.random.RandomState(seed)``, by reseeding ``generator`` where there is
    one: constructing a RandomState first seeds a fresh MT19937 from OS entropy, which costs
    hundreds of microseconds, and torchmeta constructs seven per Omniglot task."""
    if generator is None:
        return np.random.RandomState(seed)
    generator.seed(seed)
    return generator


class ReseedingClassSplitter(ClassSplitter_):
    """torchmeta's ``ClassSplitter_``, reseeding its generators instead of constructing them
    (``_reseeded``): the same draws, so the same tasks, bit for bit (tested against torchmeta's
    own methods)."""

    def seed(self, seed):
        self.np_random = _reseeded(getattr(self, "np_random", None), seed)

    def class_runs(self, task_hash: int, classes: list[tuple[int, int]]) -> OrderedDict:
        """split -> one index array per class: torchmeta's draws (splitters.py:171-198) for a task
        hashing to ``task_hash`` of ``classes`` [(class hash, examples)]. Each class's examples are
        permuted by a generator seeded from (task, class, random_state_seed), cut into consecutive
        runs per split, and each run shuffled by the splitter's generator."""
        runs = OrderedDict((split, []) for split in self.splits)
        permuter = self.__dict__.get("_permuter")
        if permuter is None:  # not setdefault: its argument, a new RandomState, costs 70 us a task
            permuter = self._permuter = np.random.RandomState(0)
        for class_hash, count in classes:
            if count < self._min_samples_per_class:
                raise ValueError(f"a class has {count} examples; ClassSplitter needs "
                                 f"{self._min_samples_per_class}")
            if self.shuffle:
                permuter.seed((task_hash + class_hash + self.random_state_seed) % 2**32)
                order = permuter.permutation(count)
            else:
                order = np.arange(count)
            start = 0
            for split, size in self.splits.items():
                run = order[start:start + size]
                if self.shuffle:
                    self.np_random.shuffle(run)
                runs[split].append(run)
                start += size
        return runs

    def get_indices_concattask(self, task):
        """As torchmeta's: ``class_runs``, each run offset to its class's place in the task."""
        counts = [len(dataset) for dataset in task.datasets]
        runs = self.class_runs(hash(task), [(hash(d), n) for d, n in zip(task.datasets, counts, strict=True)])
        offsets = np.cumsum([0, *counts[:-1]])
        return OrderedDict((split, [i for run, offset in zip(class_runs, offsets, strict=True)
                                    for i in run + offset])
                           for split, class_runs in runs.items())


def reseeding_splitter(splitter):
    """``splitter`` as a ``ReseedingClassSplitter`` if it is torchmeta's ``ClassSplitter_``."""
    if type(splitter) is ClassSplitter_:
        splitter.__class__ = ReseedingClassSplitter
    return splitter


class TaskBatches(Dataset):
    """Batches of torchmeta's tasks, addressed by [(i, classes), ...], gathered from an ``ImageStore``.

    Task i is the one torchmeta's ``CombinationMetaDataset[classes]`` gives once seeded by
    (seed, i) (its dataset.py:200-203; bit for bit, tested): the splitter's indices
    (``ReseedingClassSplitter.class_runs``), and the labels of ``Categorical``, which permutes
    them with ``torch.randperm`` on a generator seeded the same way and numbers classes in the
    order the task's first split meets them (the task's class order). Here that is an index
    computation per task and one gather per class, not a Python object per example.
    """

    def __init__(self, store: ImageStore, splitter: ReseedingClassSplitter, seed: int,
                 decode: Decode) -> None:
        self.store, self.splitter, self.seed, self.decode = store, splitter, seed, decode

    def task(self, index: int, classes: tuple[int, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (store rows [N], labels [N]) of task ``index`` over ``classes``."""
        seed = task_seed(self.seed, index)
        self.splitter.seed(seed)
        runs = self.splitter.class_runs(hash(tuple(classes)), [(c, self.store.count(c)) for c in classes])
        labels = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).numpy()
        offsets = self.store.offsets[list(classes)]
        return {split: (np.concatenate([run + at for run, at in zip(class_runs, offsets, strict=True)]),
                        np.repeat(labels, [len(run) for run in class_runs]))
                for split, class_runs in runs.items()}

    def __getitem__(self, keys: list[tuple[int, tuple[int, ...]]]) -> dict[str, list[torch.Tensor]]:
        tasks = [self.task(index, classes) for index, classes in keys]
        batch = {}
        for split in self.splitter.splits:
            rows = np.stack([task[split][0] for task in tasks])
            pixels = self.store.gather(rows.ravel()).view(*rows.shape, *self.store.pixels.shape[1:])
            labels = np.stack([task[split][1] for task in tasks])
            batch[split] = [self.decode(pixels), torch.from_numpy(labels)]
        return batch

    def __len__(self) -> int:
        return len(self.store)


def image_transform(name: str, images: str = "bilinear"):
    """(transform, decode): torchmeta's transform of a prepared image of dataset ``name``, ending
    in ``PILToTensor`` (uint8), and the ``Decode`` giving what its ``ToTensor`` would. Omniglot
    (a prepared image is inverted, 105x105): ``images`` one of ``OMNIGLOT_IMAGES``; bilinear is
    torchmeta's helper's ``Resize(28)`` (helpers.py:78), Mini-ImageNet its ``Resize(84)``
    (helpers.py:122)."""
    from torchvision.transforms import Compose, InterpolationMode, PILToTensor, Resize

    if name == "miniimagenet":
        return Compose([Resize(84), PILToTensor()]), Decode()
    if images == "bilinear":
        return Compose([Resize(28), PILToTensor()]), Decode()
    return (Compose([Resize(28, interpolation=InterpolationMode.NEAREST), PILToTensor()]),
            Decode(invert=images == "nearest_strokes_0"))


def vinyals_labels(root: str | Path, names: tuple[str, ...]) -> list[list[str]]:
    """The torchmeta labels of Vinyals' Omniglot splits ``names`` ('train', 'val', 'test'), in
    their files' order, one split after the other."""
    folder = Path(root) / "omniglot"
    return [label for name in names
            for label in json.loads((folder / f"vinyals_{name}_labels.json").read_text())]


def reptile_class_split(root: str | Path, split: str) -> list[list[str]]:
    """supervised-reptile's Omniglot classes of ``split`` ('train' or 'test'), as torchmeta labels
    [group, alphabet, character]: the characters of both sets in sorted alphabet, then character,
    order (omniglot.py:28-35), shuffled by Python's ``random`` seeded 0 (run_omniglot.py:20-22,
    ``--seed`` 0), the first 1200 for meta-training (omniglot.py:37-50)."""
    if split not in ("train", "test"):
        raise DiffoptError("the reptile class split has no validation classes (supervised-reptile "
                           "trains on 1200 characters and tests on 423): leave validation off")
    characters = sorted(vinyals_labels(root, ("train", "val", "test")),
                        key=lambda label: (label[1], label[2]))
    random.Random(0).shuffle(characters)
    return characters[:1200] if split == "train" else characters[1200:]


def vinyals_trainval_class_split(root: str | Path, split: str) -> list[list[str]]:
    """Vinyals' Omniglot classes of ``split`` ('train' or 'test') with its validation characters
    moved into meta-training: torchmeta's train then validation labels (1028 + 172), its test
    labels (423)."""
    if split not in ("train", "test"):
        raise DiffoptError("the vinyals_trainval class split has no validation classes (it meta-trains "
                           "on them): leave validation off")
    return vinyals_labels(root, ("train", "val") if split == "train" else ("test",))


CLASS_SPLIT_LABELS = {"reptile": reptile_class_split, "vinyals_trainval": vinyals_trainval_class_split}
"""The class splits besides torchmeta's own (``vinyals``): split name -> (root, split) -> labels."""


def prepare_hint(name: str, root: str) -> str:
    """What to run when dataset ``name`` is not (completely) prepared under ``root``."""
    return (f"{name} is not prepared in {Path(root) / name}: run `diffopt data prepare {name} "
            f"--source DIR --root {root}` (DIR: {SOURCES[name]})")


def torchmeta_loader(
    name: str, *, split: str, ways: int, shots: int, test_shots: int, batch_size: int,
    num_tasks: int, seed: int, root: str, num_workers: int = 0, start: int = 0, rotations: bool = True,
    images: str = "bilinear", class_split: str = "vinyals",
):
    """Batches of ``batch_size`` tasks of torchmeta's ``name`` helper from the ``split`` classes,
    tasks ``start`` .. ``num_tasks - 1``; ``rotations=False`` leaves out the rotated copies of
    the classes that torchmeta's Omniglot helper adds (``class_augmentations``); ``images``: the
    preprocessing (``OMNIGLOT_IMAGES``; Omniglot only); ``class_split``: ``CLASS_SPLITS`` (Omniglot).

    Each batch is ``{'train': (x, y), 'test': (x, y)}``: x [B, ways * shots (or test_shots),
    C, H, W] float in [0, 1], y [B, ...] int64 labels 0..ways-1.
    """
    missing = [path for path in PREPARED_FILES[name](root) if not path.is_file()]
    if missing:
        raise DiffoptError(f"{prepare_hint(name, root)}; missing {missing[0].name}")
    from torch.utils.data import BatchSampler, DataLoader
    from torchmeta.datasets import helpers

    key = (name, str(Path(root).resolve()), split, rotations, images, class_split)
    transform, decode = image_transform(name, images)
    dataset = getattr(helpers, name)(str(root), ways=ways, shots=shots, test_shots=test_shots,
                                     **{TORCHMETA_SPLITS[split]: True}, download=False, transform=transform,
                                     **({} if rotations else {"class_augmentations": None}))
    store = _IMAGE_STORES.get(key)
    if store is None:
        if class_split in CLASS_SPLIT_LABELS:
            labels = CLASS_SPLIT_LABELS[class_split](root, split)
            dataset.dataset._labels, dataset.dataset._num_classes = labels, len(labels)
        store = _IMAGE_STORES[key] = ImageStore(dataset.dataset)
    sampler = TaskSampler(len(store), ways, num_tasks, seed, start)
    batches = TaskBatches(store, reseeding_splitter(dataset.dataset_transform), seed, decode)
    return DataLoader(batches, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                      num_workers=num_workers)


def omniglot_loader(**kwargs):
    """Omniglot tasks: x [B, N, 1, 28, 28], strokes 1. See ``torchmeta_loader``."""
    return torchmeta_loader("omniglot", **kwargs)


def miniimagenet_loader(**kwargs):
    """Mini-ImageNet tasks: x [B, N, 3, 84, 84]. See ``torchmeta_loader``."""
    return torchmeta_loader("miniimagenet", **kwargs)
