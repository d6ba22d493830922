"""Mini-ImageNet: a small generated fixture in the standard distribution's formats (images/ + the
Ravi & Larochelle csv files, or the mini-imagenet-cache pkl files), through the real prepare ->
torchmeta loader -> conv-4 -> MAML / Reptile path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_same_batches, torchmeta_batches
from PIL import Image

import diffopt.data.prepare as prepare_module
from diffopt.cli import main
from diffopt.config import resolve_config
from diffopt.data import Episode, fixture, get_dataset
from diffopt.data.prepare import miniimagenet_files, prepare_miniimagenet
from diffopt.evaluate import evaluate
from diffopt.train import train

CLASSES = {"train": 6, "val": 5, "test": 5}
IMAGES_PER_CLASS = 4


def make_distribution(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """images/*.jpg and {split}.csv as distributed; returns split -> class -> image paths."""
    return fixture.make_distribution(folder, CLASSES, IMAGES_PER_CLASS)


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        return np.asarray(image if image.size == (84, 84) else image.resize((84, 84), Image.BILINEAR))


@pytest.fixture(scope="module")
def distribution(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("mini-imagenet-distribution")
    return folder, make_distribution(folder)


@pytest.fixture(scope="module")
def prepared(distribution, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    assert main(["data", "prepare", "miniimagenet", "--source", str(distribution[0]),
                 "--root", str(root)]) == 0
    return root


def test_prepare_writes_torchmetas_layout_with_the_images_pixels(distribution, prepared):
    _, layout = distribution
    folder = prepared / "miniimagenet"
    assert all(path.is_file() for path in miniimagenet_files(prepared))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in miniimagenet_files(prepared))
    for split, classes in layout.items():
        assert json.loads((folder / f"{split}_labels.json").read_text()) == sorted(classes)
        with h5py.File(folder / f"{split}_data.hdf5", "r") as hdf5:
            assert sorted(hdf5["datasets"]) == sorted(classes)
            for label, paths in classes.items():
                images = hdf5["datasets"][label][:]
                assert images.dtype == np.uint8 and images.shape == (IMAGES_PER_CLASS, 84, 84, 3)
                np.testing.assert_array_equal(images, np.stack([decoded(p) for p in paths]))


def test_the_pkl_distribution_prepares_to_the_same_files(distribution, prepared, tmp_path):
    _, layout = distribution
    source = tmp_path / "pkl"
    source.mkdir()
    for split, classes in layout.items():
        images, class_dict = [], {}
        for label, paths in classes.items():
            class_dict[label] = list(range(len(images), len(images) + len(paths)))
            images += [decoded(p) for p in paths]
        with open(source / f"mini-imagenet-cache-{split}.pkl", "wb") as file:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, file)
    prepare_miniimagenet(source, tmp_path / "root")
    for split in layout:
        names = [f"{split}_labels.json", f"{split}_data.hdf5"]
        a, b = (tmp_path / "root" / "miniimagenet", prepared / "miniimagenet")
        assert (a / names[0]).read_text() == (b / names[0]).read_text()
        with h5py.File(a / names[1], "r") as x, h5py.File(b / names[1], "r") as y:
            for label in y["datasets"]:
                np.testing.assert_array_equal(x["datasets"][label][:], y["datasets"][label][:])


@pytest.mark.slow
def test_loader_gives_84x84_rgb_tasks_and_maml_trains_and_evaluates(prepared, tmp_path):
    spec = get_dataset("miniimagenet")
    loader = spec.loader("train", seed=0, shots=1, test_shots=2, ways=5, batch_size=2, num_tasks=2,
                         root=str(prepared))
    episode = Episode.from_torchmeta(next(iter(loader)))
    assert episode.support_x.shape == (2, 5, 3, 84, 84) and episode.query_x.shape == (2, 10, 3, 84, 84)
    assert sorted(episode.support_y[0].tolist()) == list(range(5))
    assert 0 <= episode.support_x.min() and episode.support_x.max() <= 1

    config = resolve_config(dataset="miniimagenet", data_root=str(prepared), iterations=2,
                            meta_batch_size=2, test_shots=2, inner_steps=2, run_dir=str(tmp_path),
                            progress=False)
    assert (config.model, config.hidden, config.norm, config.head) == ("conv4", (32,), "batch_shift",
                                                                       "flatten")
    result = train(config)
    assert result.iterations == 2 and np.isfinite(result.final_loss)
    assert result.algorithm.model[0].weight.shape == (32, 3, 3, 3)
    scores = evaluate(result.algorithm, spec, shots=1, test_shots=3, ways=5, tasks=3, steps=(0, 1),
                      root=str(prepared), batch_size=3).scores
    for steps in (0, 1):
        assert scores[steps].shape == (3,)
        assert set(np.round(scores[steps] * 15).astype(int)) <= set(range(16))


MAMLPP = ["--inner_optimizer", "lslr", "--norm", "per_step_batch", "--multi_step_loss_epochs", "1",
          "--iterations_per_epoch", "1", "--inner_loss_reduction", "mean", "--norm_eps", "1e-5",
          "--meta_lr_schedule", "cosine", "--meta_lr_final", "1e-5", "--inner_lr", "0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, extra",
                         [("maml", []), ("fomaml", []), ("reptile", []), ("pretrain", []), ("maml", MAMLPP)],
                         ids=["maml", "fomaml", "reptile", "pretrain", "mamlpp"])
def test_every_algorithm_trains_and_evaluates_on_the_fixture(prepared, tmp_path, capsys, algorithm, extra):
    """The whole Mini-ImageNet pipeline (prepared files, torchmeta loader, conv-4 with pooling,
    training, checkpoint, evaluation from the command line) for each algorithm's defaults."""
    run = tmp_path / algorithm
    assert main(["train", "--dataset", "miniimagenet", "--algorithm", algorithm, "--data_root", str(prepared),
                 "--iterations", "2", "--meta_batch_size", "2", "--inner_steps", "2", "--shots", "1",
                 "--train_shots", "1", "--test_shots", "2",  # the fixture has 4 images per class
                 "--run_dir", str(run), "--progress", "False", *extra]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--tasks", "2", "--steps", "0,2", "--test_shots", "2",
                 "--transductive", "False" if algorithm == "reptile" else "True"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy after   2 steps" in printed and "(2 tasks)" in printed


def test_reptile_takes_its_papers_mini_imagenet_protocol():
    config = resolve_config(dataset="miniimagenet", algorithm="reptile")
    assert (config.train_shots + config.test_shots, config.inner_batch_size, config.inner_steps,
            config.inner_optimizer, config.inner_lr, config.meta_batch_size, config.validation_steps,
            config.meta_lr, config.meta_lr_final) == (15, 10, 8, "adam_beta1_0", 0.001, 5, 50, 1.0, 0.0)


def test_half_prepared_data_names_the_prepare_command(prepared, tmp_path, capsys):
    root = tmp_path / "half"
    (root / "miniimagenet").mkdir(parents=True)
    for path in miniimagenet_files(prepared):
        if path.name != "val_data.hdf5":
            (root / "miniimagenet" / path.name).write_bytes(path.read_bytes())
    assert main(["train", "--dataset", "miniimagenet", "--data_root", str(root), "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing val_data.hdf5" in err
    assert f"run `diffopt data prepare miniimagenet --source DIR --root {root}`" in err


def test_a_failed_prepare_leaves_no_file_torchmeta_would_read(distribution, tmp_path, monkeypatch):
    read = prepare_module._read_miniimagenet_csv

    def fail_on_val(source, split):
        if split == "val":
            raise OSError("disk full")
        return read(source, split)

    monkeypatch.setattr(prepare_module, "_read_miniimagenet_csv", fail_on_val)
    with pytest.raises(OSError, match="disk full"):
        prepare_miniimagenet(distribution[0], tmp_path)
    left = sorted(p.name for p in (tmp_path / "miniimagenet").iterdir())
    assert left == ["train_data.hdf5", "train_labels.json"]  # no partial file, no val or test
    assert not all(path.is_file() for path in miniimagenet_files(tmp_path))


def test_a_source_without_mini_imagenet_is_a_one_line_error(tmp_path, capsys):
    assert main(["data", "prepare", "miniimagenet", "--source", str(tmp_path), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "images/ with train.csv" in err and "mini-imagenet-cache" in err


def test_task_i_is_the_same_wherever_the_stream_starts(prepared):
    spec = get_dataset("miniimagenet")
    kwargs = dict(seed=3, shots=1, test_shots=1, ways=5, batch_size=1, num_tasks=3, root=str(prepared))
    a = [b["train"][0] for b in spec.loader("val", **kwargs)]
    b = [b["train"][0] for b in spec.loader("val", **kwargs, start=1)]
    assert all(torch.equal(x, y) for x, y in zip(a[1:], b, strict=True))


def test_tasks_are_torchmetas_bit_for_bit_from_a_uint8_store(prepared):
    """The gathered tasks are those torchmeta's own dataset, splitter, labels and collate give,
    on the first read (filling the image store) and later ones; the store holds uint8 pixels."""
    from diffopt.data import images

    kwargs = dict(split="train", seed=5, shots=1, test_shots=3, ways=3, batch_size=2, num_tasks=4,
                  root=str(prepared))
    theirs = torchmeta_batches("miniimagenet", **kwargs)
    images._IMAGE_STORES.clear()
    for _ in range(2):
        assert_same_batches(list(images.miniimagenet_loader(**kwargs)), theirs)
    (store,) = [store for key, store in images._IMAGE_STORES.items()
                if key[:3] == ("miniimagenet", str(prepared.resolve()), "train")]
    assert store.pixels.dtype == torch.uint8


def test_a_filled_store_serves_every_task_without_reading(prepared, monkeypatch):
    """``ImageStore.fill`` reads every image once; tasks drawn afterwards read none and are the
    same as torchmeta's."""
    from diffopt.data import images

    kwargs = dict(split="val", seed=2, shots=2, test_shots=2, ways=4, batch_size=2, num_tasks=4,
                  root=str(prepared))
    images._IMAGE_STORES.clear()
    loader = images.miniimagenet_loader(**kwargs)
    store = loader.dataset.store
    store.fill()
    assert store._read.all() and len(store._read) == store.offsets[-1] == CLASSES["val"] * IMAGES_PER_CLASS

    def no_reading(index):
        raise AssertionError(f"class {index} read after fill")

    monkeypatch.setattr(store, "dataset", no_reading)
    assert_same_batches(list(loader), torchmeta_batches("miniimagenet", **kwargs))
