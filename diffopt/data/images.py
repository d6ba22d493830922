"""Few-shot image datasets through torchmeta's helpers and ``BatchMetaDataLoader``.

Omniglot (Lake et al. 2015, torchmeta's ``omniglot``): 28x28 images (Resize, as MAML), classes
rotated by 90, 180 and 270 degrees as new classes (as MAML), the Vinyals et al. split of
characters into meta-train / meta-val / meta-test. Mini-ImageNet (Vinyals et al. 2016,
torchmeta's ``miniimagenet``): 84x84 RGB images, the Ravi & Larochelle 64 / 16 / 20 class split.
Both must be prepared first (``diffopt data prepare NAME``).

Task i of a stream is a function of (seed, i) alone: ``TaskSampler`` draws its classes from a
generator seeded by (seed, i), and ``IndexedTasks`` reseeds torchmeta's splitter by (seed, i)
before building it. So a stream can start anywhere (resuming) or be split between processes
and still be the same tasks.

torchmeta reads, decodes, rotates and resizes every example of every task from its HDF5 file;
``CachedClasses`` keeps each transformed image once read (large ones as uint8 where that is
exact, which it is for ``ToTensor``'s output), so a class's images cost that once per process:
the tasks are the same tensors, bit for bit, at a fraction of the cost.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from diffopt.data.prepare import PREPARED_FILES, SOURCES
from diffopt.data.torchmeta_compat import load as load_torchmeta
from diffopt.errors import DiffoptError

load_torchmeta()  # before torchmeta's own imports below: its fixes (torchmeta_compat)
from torchmeta.transforms.splitters import ClassSplitter_  # noqa: E402
from torchmeta.utils.data.dataset import _seed_dataset_transform  # noqa: E402

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


class Examples(Dataset):
    """A task split's (image, label) pairs, already read."""

    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __getitem__(self, index: int):
        return self.examples[index]

    def __len__(self) -> int:
        return len(self.examples)


_IMAGE_CACHES: dict[tuple, dict[int, dict[int, torch.Tensor]]] = {}
"""(dataset, root, split, rotations, images, class split) -> class index -> example index -> image."""


def _compact(image: torch.Tensor) -> torch.Tensor:
    """A large ``image`` as uint8 where ``uint8 / 255`` gives it back exactly (ToTensor's output),
    else as is (a small one: converting it back would cost more time than it saves memory)."""
    if not image.is_floating_point() or image.numel() <= 4096:
        return image
    pixels = (image * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels if torch.equal(pixels.to(image.dtype).div(255), image) else image


def _expand(image: torch.Tensor) -> torch.Tensor:
    return image.to(torch.get_default_dtype()).div(255) if image.dtype == torch.uint8 else image


class CachedImages(Dataset):
    """Class ``index`` of a torchmeta class dataset, each transformed image kept in ``cache``.

    torchmeta's per-class dataset is built only to read an image not cached yet. The target is
    the class's own, through ``target_transforms``, to which torchmeta's tasks append their label
    maps (``target_transform_append``: torchmeta's ``Dataset`` interface).
    """

    def __init__(self, classes, index: int, cache: dict) -> None:
        self.classes, self.index, self.cache = classes, index, cache
        self._dataset = None
        if "length" not in cache:
            self._read()
        self.target_transforms = [t for t in (cache["target_transform"],) if t is not None]

    def _read(self):
        """torchmeta's dataset of this class (built once), its raw targets: no label map."""
        if self._dataset is None:
            self._dataset = self.classes[self.index]
            self.cache.setdefault("length", len(self._dataset))
            self.cache.setdefault("target_transform", self._dataset.target_transform)
            self._dataset.target_transform = None
        return self._dataset

    def target_transform_append(self, transform) -> None:
        if transform is not None:
            self.target_transforms.append(transform)

    def __hash__(self) -> int:
        return hash(self.index)

    def __len__(self) -> int:
        return self.cache["length"]

    def __getitem__(self, index: int):
        index = int(index)  # torchmeta's splitter gives numpy integers
        if index not in self.cache:
            image, target = self._read()[index]
            self.cache[index] = _compact(image)
            self.cache.setdefault("target", target)
        target = self.cache["target"]
        for transform in self.target_transforms:
            target = transform(target)
        return _expand(self.cache[index]), target


class CachedClasses:
    """A torchmeta class dataset whose classes are ``CachedImages`` over one shared cache."""

    def __init__(self, classes, cache: dict[int, dict]) -> None:
        self.classes, self.cache = classes, cache

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> CachedImages:
        return CachedImages(self.classes, index, self.cache.setdefault(index, {}))

    def __getattr__(self, name: str):
        return getattr(self.classes, name)


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

    def get_indices_concattask(self, task):
        """As torchmeta's (splitters.py:171-198): each class's examples are permuted by a
        generator seeded from (task, class, random_state_seed), cut into consecutive runs per
        split, each run shuffled by the splitter's generator, and offset into the task."""
        indices = OrderedDict((split, []) for split in self.splits)
        permuter = self.__dict__.get("_permuter")
        if permuter is None:  # not setdefault: its argument, a new RandomState, costs 70 us a task
            permuter = self._permuter = np.random.RandomState(0)
        offset = 0
        for dataset in task.datasets:
            count = len(dataset)
            if count < self._min_samples_per_class:
                raise ValueError(f"a class has {count} examples; ClassSplitter needs "
                                 f"{self._min_samples_per_class}")
            if self.shuffle:
                permuter.seed((hash(task) + hash(dataset) + self.random_state_seed) % 2**32)
                order = permuter.permutation(count)
            else:
                order = np.arange(count)
            start = 0
            for split, size in self.splits.items():
                run = order[start:start + size]
                if self.shuffle:
                    self.np_random.shuffle(run)
                indices[split].extend(run + offset)
                start += size
            offset += count
        return indices


def reseeding_splitter(splitter):
    """``splitter`` as a ``ReseedingClassSplitter`` if it is torchmeta's ``ClassSplitter_``."""
    if type(splitter) is ClassSplitter_:
        splitter.__class__ = ReseedingClassSplitter
    return splitter


class IndexedTasks(Dataset):
    """A torchmeta ``CombinationMetaDataset`` addressed by (i, classes), reseeded per task.

    torchmeta draws two things from shared state: the splitter shuffles each split with its own
    generator, and ``Categorical`` permutes the labels with ``torch.randperm`` on torch's global
    generator, lazily, when the loader's collate reads the first example. Both are seeded by
    (seed, i) here, and the task's examples are read at once inside ``torch.random.fork_rng``,
    so the labels are fixed and the caller's torch random state is left as it was.
    """

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key):
        index, classes = key
        seed = task_seed(self.seed, index)
        # = self.dataset.seed(seed) (torchmeta dataset.py:200-203), without constructing generators
        self.dataset.np_random = _reseeded(getattr(self.dataset, "np_random", None), seed)
        _seed_dataset_transform(self.dataset.dataset_transform, seed=seed)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds every accelerator (lazily, at a
            # cost of about a millisecond a task)
            torch.default_generator.manual_seed(seed)
            task = self.dataset[classes]  # {'train': examples, 'test': examples}
            return OrderedDict((split, Examples([examples[i] for i in range(len(examples))]))
                               for split, examples in task.items())

    def __len__(self) -> int:
        return len(self.dataset)


class _StrokesZero:
    """x -> 1 - x: strokes 0 on a background of 1, as the original PNGs (picklable for workers)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return 1 - image


def omniglot_transform(images: str):
    """The transform from a prepared (inverted, 105x105) Omniglot image to a [1, 28, 28] tensor;
    ``images`` is one of ``OMNIGLOT_IMAGES``."""
    from torchvision.transforms import Compose, InterpolationMode, Resize, ToTensor

    if images == "bilinear":
        return Compose([Resize(28), ToTensor()])  # torchmeta's helper (helpers.py:78)
    steps = [Resize(28, interpolation=InterpolationMode.NEAREST), ToTensor()]
    return Compose(steps + ([_StrokesZero()] if images == "nearest_strokes_0" else []))


def reptile_class_split(root: str | Path, split: str) -> list[list[str]]:
    """supervised-reptile's Omniglot classes of ``split`` ('train' or 'test'), as torchmeta labels
    [group, alphabet, character]: the characters of both sets in sorted alphabet, then character,
    order (omniglot.py:28-35), shuffled by Python's ``random`` seeded 0 (run_omniglot.py:20-22,
    ``--seed`` 0), the first 1200 for meta-training (omniglot.py:37-50)."""
    if split not in ("train", "test"):
        raise DiffoptError("the reptile class split has no validation classes (supervised-reptile "
                           "trains on 1200 characters and tests on 423): leave validation off")
    folder = Path(root) / "omniglot"
    characters = sorted((label for name in ("train", "val", "test")
                         for label in json.loads((folder / f"vinyals_{name}_labels.json").read_text())),
                        key=lambda label: (label[1], label[2]))
    random.Random(0).shuffle(characters)
    return characters[:1200] if split == "train" else characters[1200:]


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
    from torchmeta.datasets import helpers
    from torchmeta.utils.data import BatchMetaDataLoader

    options = {} if rotations else {"class_augmentations": None}
    if images != "bilinear":
        options["transform"] = omniglot_transform(images)
    dataset = getattr(helpers, name)(str(root), ways=ways, shots=shots, test_shots=test_shots,
                                     **{TORCHMETA_SPLITS[split]: True}, download=False, **options)
    if class_split == "reptile":
        labels = reptile_class_split(root, split)
        dataset.dataset._labels, dataset.dataset._num_classes = labels, len(labels)
    key = (name, str(Path(root).resolve()), split, rotations, images, class_split)
    cache = _IMAGE_CACHES.setdefault(key, {})
    dataset.dataset_transform = reseeding_splitter(dataset.dataset_transform)
    dataset.dataset = CachedClasses(dataset.dataset, cache)
    sampler = TaskSampler(len(dataset.dataset), ways, num_tasks, seed, start)
    return BatchMetaDataLoader(IndexedTasks(dataset, seed), batch_size=batch_size, sampler=sampler,
                               shuffle=False, num_workers=num_workers)


def omniglot_loader(**kwargs):
    """Omniglot tasks: x [B, N, 1, 28, 28], strokes 1. See ``torchmeta_loader``."""
    return torchmeta_loader("omniglot", **kwargs)


def miniimagenet_loader(**kwargs):
    """Mini-ImageNet tasks: x [B, N, 3, 84, 84]. See ``torchmeta_loader``."""
    return torchmeta_loader("miniimagenet", **kwargs)
