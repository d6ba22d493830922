"""Offline dataset preparation: the files torchmeta's datasets read with ``download=False``.

``diffopt data prepare omniglot --source DIR --root ROOT`` turns the two Omniglot zips in DIR into
``ROOT/omniglot/``: ``data.hdf5`` (groups ``images_background`` and ``images_evaluation``, one
uint8 [n, 105, 105] array per ``<Alphabet>/<characterNN>``, inverted so strokes are 255, drawings
in file-name order) and the label files torchmeta reads: ``train_labels.json`` /
``test_labels.json`` (the background / evaluation alphabets) and ``vinyals_{train,val,test}_labels.json``
(the split of Vinyals et al., from torchmeta's own assets). Every file is written under a
temporary name and renamed when complete, the hdf5 last: an interrupted prepare never leaves a
file torchmeta would take for a prepared dataset.

``diffopt data prepare miniimagenet --source DIR --root ROOT`` reads the standard distribution,
either ``DIR/images/*.jpg`` with the Ravi & Larochelle ``DIR/{train,val,test}.csv`` (rows
``filename,label``; images resized to 84x84 RGB where they are not already) or the
``DIR/mini-imagenet-cache-{split}.pkl`` files, and writes ``ROOT/miniimagenet/``: per split,
``{split}_labels.json`` (sorted class names) and ``{split}_data.hdf5`` (group ``datasets``, one
uint8 [n, 84, 84, 3] array per class, images in file order), the hdf5 files last.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from diffopt.atomic import atomic_path, write_text
from diffopt.errors import DiffoptError

OMNIGLOT_GROUPS = {"images_background": "train", "images_evaluation": "test"}
VINYALS_SPLITS = ("train", "val", "test")


def omniglot_files(root: str | os.PathLike) -> list[Path]:
    """Every file ``torchmeta.datasets.Omniglot`` needs under ``root`` (the hdf5 last)."""
    folder = Path(root) / "omniglot"
    labels = [f"{split}_labels.json" for split in OMNIGLOT_GROUPS.values()]
    labels += [f"vinyals_{split}_labels.json" for split in VINYALS_SPLITS]
    return [folder / name for name in labels] + [folder / "data.hdf5"]


def _read_omniglot_zip(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """(alphabet, character) -> uint8 [drawings, 105, 105], strokes 255, in file-name order."""
    from PIL import Image, ImageOps

    drawings: dict[tuple[str, str], list[str]] = defaultdict(list)
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                drawings[parts[1], parts[2]].append(name)
        if not drawings:
            raise DiffoptError(f"{path} holds no <group>/<Alphabet>/<character>/*.png images")
        return {
            key: np.stack([
                np.asarray(ImageOps.invert(Image.open(io.BytesIO(archive.read(n))).convert("L")))
                for n in names
            ])
            for key, names in sorted(drawings.items())
        }


def prepare_omniglot(source: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Write ``root/omniglot`` from ``images_background.zip`` and ``images_evaluation.zip`` in
    ``source``; return the folder. Already prepared: nothing is rewritten."""
    import h5py

    from diffopt.data.torchmeta_compat import load as load_torchmeta

    load_torchmeta()  # its fixes first
    from torchmeta.datasets.utils import get_asset

    files = omniglot_files(root)
    folder = files[0].parent
    if all(f.is_file() for f in files):
        return folder
    source = Path(source)
    zips = {group: source / f"{group}.zip" for group in OMNIGLOT_GROUPS}
    missing = [str(path) for path in zips.values() if not path.is_file()]
    if missing:
        raise DiffoptError(f"no Omniglot zip at {missing[0]}: --source must be the folder holding "
                           "images_background.zip and images_evaluation.zip")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(files[-1]) as tmp:  # data.hdf5 appears last, once everything is written
        with h5py.File(tmp, "w") as hdf5:
            for group, split in OMNIGLOT_GROUPS.items():
                characters = _read_omniglot_zip(zips[group])
                h5_group = hdf5.create_group(group)
                for (alphabet, character), images in characters.items():
                    h5_group.create_dataset(f"{alphabet}/{character}", data=images)
                labels = sorted([group, alphabet, character] for alphabet, character in characters)
                write_text(folder / f"{split}_labels.json", json.dumps(labels))
        for split in VINYALS_SPLITS:
            asset = get_asset("omniglot", f"{split}.json", dtype="json")
            labels = sorted([f"images_{name}", alphabet, character]
                            for name, alphabets in asset.items()
                            for alphabet, characters in alphabets.items()
                            for character in characters)
            write_text(folder / f"vinyals_{split}_labels.json", json.dumps(labels))
    return folder


MINIIMAGENET_SPLITS = ("train", "val", "test")
MINIIMAGENET_SIZE = 84


def miniimagenet_files(root: str | os.PathLike) -> list[Path]:
    """Every file ``torchmeta.datasets.MiniImagenet`` needs under ``root`` (the hdf5 files last)."""
    folder = Path(root) / "miniimagenet"
    return ([folder / f"{split}_labels.json" for split in MINIIMAGENET_SPLITS]
            + [folder / f"{split}_data.hdf5" for split in MINIIMAGENET_SPLITS])


def _read_miniimagenet_csv(source: Path, split: str) -> dict[str, np.ndarray]:
    """class -> uint8 [n, 84, 84, 3] from ``split.csv`` and the ``images/`` folder."""
    from PIL import Image

    names: dict[str, list[str]] = defaultdict(list)
    with open(source / f"{split}.csv", newline="") as rows:
        for row in csv.DictReader(rows):
            names[row["label"]].append(row["filename"])
    size = (MINIIMAGENET_SIZE, MINIIMAGENET_SIZE)

    def read(name: str) -> np.ndarray:
        path = source / "images" / name
        if not path.is_file():
            raise DiffoptError(f"{split}.csv lists {name}, which is not in {source / 'images'}")
        with Image.open(path) as image:
            image = image.convert("RGB")
            return np.asarray(image if image.size == size else image.resize(size, Image.BILINEAR))

    return {label: np.stack([read(name) for name in files]) for label, files in names.items()}


def _read_miniimagenet_pkl(source: Path, split: str) -> dict[str, np.ndarray]:
    """class -> uint8 [n, 84, 84, 3] from ``mini-imagenet-cache-{split}.pkl``."""
    with open(source / f"mini-imagenet-cache-{split}.pkl", "rb") as file:
        cache = pickle.load(file)  # the distribution's own format: only prepare trusted files
    images = np.asarray(cache["image_data"], dtype=np.uint8)
    return {label: images[np.asarray(indices)] for label, indices in cache["class_dict"].items()}


def prepare_miniimagenet(source: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Write ``root/miniimagenet`` from the images + csv or the pkl distribution in ``source``;
    return the folder. Already prepared: nothing is rewritten."""
    import h5py

    files = miniimagenet_files(root)
    folder = files[0].parent
    if all(f.is_file() for f in files):
        return folder
    source = Path(source)
    if (source / "images").is_dir() and all((source / f"{s}.csv").is_file() for s in MINIIMAGENET_SPLITS):
        read = _read_miniimagenet_csv
    elif all((source / f"mini-imagenet-cache-{s}.pkl").is_file() for s in MINIIMAGENET_SPLITS):
        read = _read_miniimagenet_pkl
    else:
        raise DiffoptError(f"no Mini-ImageNet in {source}: --source must hold images/ with train.csv, "
                           "val.csv and test.csv, or mini-imagenet-cache-{train,val,test}.pkl")
    folder.mkdir(parents=True, exist_ok=True)
    for split in MINIIMAGENET_SPLITS:
        classes = read(source, split)
        shapes = {images.shape[1:] for images in classes.values()}
        if shapes != {(MINIIMAGENET_SIZE, MINIIMAGENET_SIZE, 3)}:
            raise DiffoptError(f"Mini-ImageNet {split} images must be 84x84 RGB; found {sorted(shapes)}")
        write_text(folder / f"{split}_labels.json", json.dumps(sorted(classes)))
        with atomic_path(folder / f"{split}_data.hdf5") as tmp, h5py.File(tmp, "w") as hdf5:
            group = hdf5.create_group("datasets")
            for label in sorted(classes):
                group.create_dataset(label, data=classes[label])
    return folder


PREPARERS = {"omniglot": prepare_omniglot, "miniimagenet": prepare_miniimagenet}
PREPARED_FILES = {"omniglot": omniglot_files, "miniimagenet": miniimagenet_files}
SOURCES = {
    "omniglot": "the folder with images_background.zip and images_evaluation.zip",
    "miniimagenet": "the folder with images/ and train.csv, val.csv, test.csv, "
                    "or mini-imagenet-cache-{train,val,test}.pkl",
}
"""What ``--source`` must hold, per dataset."""
