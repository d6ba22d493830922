"""Offline dataset preparation: the real Omniglot zips into exactly what torchmeta reads, and no
partial output when preparation fails."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SHARED_OMNIGLOT, assert_same_batches, torchmeta_batches
from PIL import Image

import diffopt.data.prepare as prepare_module
from diffopt.cli import main
from diffopt.data import Episode
from diffopt.data.prepare import omniglot_files, prepare_omniglot
from diffopt.errors import DiffoptError
from diffopt.runfolder import load_checkpoint
from diffopt.train import load_trained
from diffopt.unroll import batch_order


@pytest.mark.slow
def test_prepared_omniglot_is_the_real_data_in_torchmetas_layout(omniglot_root):
    folder = omniglot_root / "omniglot"
    assert all(path.is_file() for path in omniglot_files(omniglot_root))
    with h5py.File(folder / "data.hdf5", "r") as hdf5:
        for group, npz_name, split in [("images_background", "images_background.npz", "train"),
                                       ("images_evaluation", "images_evaluation.npz", "test")]:
            labels = json.loads((folder / f"{split}_labels.json").read_text())
            reference = np.load(SHARED_OMNIGLOT / npz_name)["images"]  # True = white background
            with open(SHARED_OMNIGLOT / "omniglot_characters.csv") as handle:  # the npz's order
                order = [(r["alphabet"], r["character_dir"]) for r in csv.DictReader(handle)
                         if f"images_{r['set']}" == group]
            assert len(labels) == len(order) == reference.shape[0]
            assert {name for name, _, _ in labels} == {group}
            for _, alphabet, character in labels[:: len(labels) // 7]:
                images = hdf5[f"{group}/{alphabet}/{character}"][:]
                assert images.dtype == np.uint8 and images.shape == (20, 105, 105)
                reference_images = reference[order.index((alphabet, character))]
                np.testing.assert_array_equal(images == 255, ~reference_images)
                assert set(np.unique(images)) == {0, 255}
    vinyals = {s: json.loads((folder / f"vinyals_{s}_labels.json").read_text())
               for s in ("train", "val", "test")}
    assert sum(map(len, vinyals.values())) == 964 + 659
    assert not set(map(tuple, vinyals["train"])) & set(map(tuple, vinyals["test"]))


@pytest.mark.slow
def test_torchmeta_reads_the_prepared_folder(omniglot_root):
    from diffopt.data.torchmeta_compat import load

    load()  # its fixes first
    from torchmeta.datasets.helpers import omniglot
    from torchmeta.utils.data import BatchMetaDataLoader

    dataset = omniglot(str(omniglot_root), ways=5, shots=1, test_shots=15, meta_test=True,
                       download=False)
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=2, num_workers=0)))
    assert tuple(batch["train"][0].shape) == (2, 5, 1, 28, 28)
    assert tuple(batch["test"][0].shape) == (2, 75, 1, 28, 28)
    assert 0 <= batch["train"][0].min() and batch["train"][0].max() <= 1
    assert (batch["train"][0] > 0.5).float().mean() < 0.5  # strokes bright on a dark background


def fake_omniglot_zips(folder: Path) -> None:
    """Two tiny zips in the official layout: 2 alphabets x 2 characters x 3 drawings."""
    rng = np.random.default_rng(0)
    for group in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(folder / f"{group}.zip", "w") as archive:
            for alphabet in ("Alpha", "Beta"):
                for character in ("character01", "character02"):
                    for drawing in range(3):
                        path = folder / "png.png"
                        Image.fromarray(rng.random((105, 105)) > 0.1).save(path)
                        archive.write(path, f"{group}/{alphabet}/{character}/{drawing:04d}_01.png")


def test_failed_prepare_leaves_no_dataset_behind(tmp_path, monkeypatch):
    fake_omniglot_zips(tmp_path)
    real = prepare_module._read_omniglot_zip
    calls = []

    def fail_on_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(prepare_module, "_read_omniglot_zip", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        prepare_omniglot(tmp_path, tmp_path / "root")
    folder = tmp_path / "root" / "omniglot"
    assert not (folder / "data.hdf5").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left
    monkeypatch.setattr(prepare_module, "_read_omniglot_zip", real)
    assert prepare_omniglot(tmp_path, tmp_path / "root") == folder  # a rerun completes
    with h5py.File(folder / "data.hdf5", "r") as hdf5:
        assert hdf5["images_evaluation/Beta/character02"].shape == (3, 105, 105)
    assert oct((folder / "data.hdf5").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_prepare_command_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "prepare", "omniglot", "--source", str(tmp_path), "--root", str(tmp_path)]) == 2
    assert "no Omniglot zip at" in capsys.readouterr().err
    assert main(["data", "prepare", "imagenet", "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset to prepare 'imagenet'; choose one of: miniimagenet, omniglot" in err
    assert main(["data", "prepare", "omniglot"]) == 2
    assert "--source DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_omniglot_end_to_end_maml_conv4(omniglot_root, tmp_path):
    """The real pipeline: prepared data -> torchmeta loader -> conv-4 MAML -> evaluation."""
    run = tmp_path / "run"
    assert main(["train", "--dataset", "omniglot", "--data_root", str(omniglot_root),
                 "--iterations", "2", "--meta_batch_size", "2", "--run_dir", str(run),
                 "--progress", "False"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    from diffopt.data import get_dataset
    from diffopt.evaluate import evaluate
    from diffopt.runfolder import load_checkpoint
    from diffopt.train import build

    payload = load_checkpoint(run)
    from diffopt.config import resolve_config

    config = resolve_config(**payload["config"])
    algorithm = build(config)
    algorithm.load_state_dict(payload["algorithm"])
    assert algorithm.model[0].weight.shape == (64, 1, 3, 3)
    result = evaluate(algorithm, get_dataset("omniglot"), shots=1, test_shots=3, ways=5, tasks=4,
                      steps=(0, 1), root=str(omniglot_root), batch_size=2)
    for steps in (0, 1):
        assert result.scores[steps].shape == (4,)
        assert set(np.round(result.scores[steps] * 15).astype(int)) <= set(range(16))
    assert main(["evaluate", str(run), "--tasks", "4", "--steps", "1", "--rotations", "False"]) == 0
    (written,) = run.glob("eval-k1-trans-*.json")
    unrotated = json.loads(written.read_text())
    assert unrotated["protocol"]["rotations"] is False and len(unrotated["scores"]["1"]) == 4


@pytest.mark.slow
def test_omniglot_task_i_is_the_same_wherever_the_stream_starts(omniglot_root):
    from diffopt.data.images import omniglot_loader

    kwargs = dict(split="val", ways=3, shots=1, test_shots=2, batch_size=1, num_tasks=4, seed=7,
                  root=str(omniglot_root))
    whole = [b for b in omniglot_loader(**kwargs)]
    tail = [b for b in omniglot_loader(**kwargs, start=2)]
    assert len(whole) == 4 and len(tail) == 2
    for a, b in zip(whole[2:], tail, strict=True):
        for split in ("train", "test"):
            assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
    assert not torch.equal(whole[0]["train"][0], whole[1]["train"][0])


def test_unprepared_omniglot_names_the_prepare_command(tmp_path, capsys):
    assert main(["train", "--dataset", "omniglot", "--data_root", str(tmp_path), "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"run `diffopt data prepare omniglot --source DIR --root {tmp_path}`" in err


@pytest.mark.slow
def test_omniglot_reptile_with_its_papers_protocol(omniglot_root, tmp_path):
    from diffopt.config import resolve_config
    from diffopt.train import train

    config = resolve_config(dataset="omniglot", algorithm="reptile", data_root=str(omniglot_root),
                            iterations=2, meta_batch_size=2, run_dir=str(tmp_path), progress=False)
    assert (config.train_shots, config.inner_batch_size, config.inner_optimizer, config.inner_steps,
            config.inner_lr) == (5, 10, "adam_beta1_0", 5, 0.001)
    result = train(config)
    assert result.iterations == 2 and np.isfinite(result.final_loss)


@pytest.mark.slow
def test_omniglot_loader_workers_give_the_same_tasks(omniglot_root):
    from diffopt.data.images import omniglot_loader

    kwargs = dict(split="train", ways=5, shots=1, test_shots=2, batch_size=2, num_tasks=6, seed=11,
                  root=str(omniglot_root))
    alone = list(omniglot_loader(**kwargs))
    workers = list(omniglot_loader(**kwargs, num_workers=2))
    assert len(alone) == len(workers) == 3
    for a, b in zip(alone, workers, strict=True):
        for split in ("train", "test"):
            assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])


@pytest.mark.slow
def test_a_tasks_inner_mini_batches_are_the_same_in_every_loader(omniglot_root):
    """Task i's inner mini-batches depend on (seed, i) alone: a loader started at task 2 (a
    resumed run), or one with worker processes, gives task i the same shuffles."""
    from diffopt.data.images import omniglot_loader

    kwargs = dict(split="train", ways=5, shots=5, test_shots=5, batch_size=2, num_tasks=6, seed=11,
                  root=str(omniglot_root))

    def orders(**options):
        return [batch_order(torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y]), 5, 10)
                for batch in omniglot_loader(**kwargs, **options) for t in Episode.from_torchmeta(batch)]

    alone = orders()
    assert len(alone) == 6 and len({tuple(o.flatten().tolist()) for o in alone}) == 6
    for other in (orders(start=2), orders(num_workers=2)[2:]):
        assert len(other) == 4 and all(torch.equal(a, b) for a, b in zip(alone[2:], other, strict=True))


@pytest.mark.parametrize("options", [
    dict(split="val", ways=5, shots=1, test_shots=2, batch_size=2, num_tasks=4, seed=3),
    dict(split="train", ways=3, shots=5, test_shots=5, batch_size=3, num_tasks=3, seed=8, start=1,
         images="nearest_strokes_0", rotations=False),
    dict(split="train", ways=5, shots=2, test_shots=1, batch_size=1, num_tasks=2, seed=0, images="nearest",
         class_split="reptile"),
])
def test_omniglot_tasks_are_torchmetas_bit_for_bit(omniglot_root, options):
    """diffopt's gathered uint8 tasks are those torchmeta's own dataset, splitter, labels and
    collate give for the same stream, on the first read (filling the image store) and later ones."""
    from diffopt.data import images

    kwargs = dict(options, root=str(omniglot_root))
    theirs = torchmeta_batches("omniglot", **kwargs)
    images._IMAGE_STORES.clear()
    for _ in range(2):
        assert_same_batches(list(images.omniglot_loader(**kwargs)), theirs)


@pytest.mark.slow
def test_omniglot_rotations_are_new_classes(omniglot_root):
    """As MAML: each character rotated by 90, 180 and 270 degrees is a class of its own."""
    from diffopt.data.images import omniglot_loader

    loader = omniglot_loader(split="train", ways=5, shots=1, test_shots=1, batch_size=1, num_tasks=1,
                             seed=0, root=str(omniglot_root))
    store = loader.dataset.store
    characters = len(json.loads((omniglot_root / "omniglot" / "vinyals_train_labels.json").read_text()))
    assert len(store) == 4 * characters

    def first(c):
        return loader.dataset.decode(store.gather(store.offsets[c:c + 1]))[0]

    for k in (1, 2, 3):
        original, rotated = first(7), first(7 + k * characters)
        assert original.shape == rotated.shape == (1, 28, 28)
        torch.testing.assert_close(rotated, torch.rot90(original, k, dims=(1, 2)), atol=0.02, rtol=0)
        assert not torch.allclose(rotated, original, atol=0.02)


def test_omniglot_test_tasks_without_rotations_use_the_characters_alone(omniglot_root):
    """Reptile's and MAML++'s test protocol (``evaluate --rotations False``): the test split's
    characters, none of their rotated copies; the character images are those of the rotated pool."""
    from diffopt.data import get_dataset

    spec = get_dataset("omniglot")
    common = dict(seed=0, shots=1, test_shots=1, ways=5, batch_size=2, num_tasks=4, root=str(omniglot_root))
    plain, rotated = spec.loader("test", rotations=False, **common), spec.loader("test", **common)
    characters = len(json.loads((omniglot_root / "omniglot" / "vinyals_test_labels.json").read_text()))
    assert len(plain.dataset.store) == characters
    assert len(rotated.dataset.store) == 4 * characters
    assert torch.equal(plain.dataset.store.gather(plain.dataset.store.offsets[11:12] + 3),
                       rotated.dataset.store.gather(rotated.dataset.store.offsets[11:12] + 3))
    batch = next(iter(plain))
    assert batch["train"][0].shape == (2, 5, 1, 28, 28)
    with pytest.raises(DiffoptError, match="--rotations False applies to omniglot"):
        get_dataset("sinusoid").loader("test", rotations=False, **{**common, "ways": None})


def test_omniglot_image_preprocessings(omniglot_root):
    """``--images``: torchmeta's bilinear grey images, or the originals' binary nearest-neighbour
    ones with strokes 1 (cbfinn/maml) or 0 (supervised-reptile, MAML++)."""
    from diffopt.data import get_dataset

    spec = get_dataset("omniglot")
    common = dict(seed=0, shots=1, test_shots=1, ways=5, batch_size=2, num_tasks=2, root=str(omniglot_root))
    pictures = {images: next(iter(spec.loader("test", images=images, **common)))["train"][0]
                for images in ("bilinear", "nearest", "nearest_strokes_0")}
    assert len(torch.unique(pictures["bilinear"])) > 10  # grey levels
    assert set(torch.unique(pictures["nearest"]).tolist()) == {0.0, 1.0}
    assert pictures["nearest"].mean() < 0.5  # strokes 1 on a background of 0
    torch.testing.assert_close(pictures["nearest_strokes_0"], 1 - pictures["nearest"])
    # the same tasks (classes, examples, order): the binary image is near the grey one
    assert (pictures["nearest"] - pictures["bilinear"]).abs().mean() < 0.1
    with pytest.raises(DiffoptError, match="unknown omniglot image preprocessing 'lanczos'"):
        spec.loader("test", images="lanczos", **common)


def test_every_loader_of_a_run_uses_its_image_preprocessing(omniglot_root, tmp_path, monkeypatch):
    """Training, validation and ``diffopt evaluate`` all read the run's ``--images``."""
    from diffopt.data import DatasetSpec

    seen = []
    original = DatasetSpec.loader

    def spy(self, split, **kwargs):
        seen.append((split, kwargs.get("images")))
        return original(self, split, **kwargs)

    monkeypatch.setattr(DatasetSpec, "loader", spy)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "omniglot", "--data_root", str(omniglot_root), "--iterations", "2",
                 "--meta_batch_size", "2", "--validate_every", "1", "--validation_tasks", "2",
                 "--images", "nearest_strokes_0", "--run_dir", str(run), "--progress", "False"]) == 0
    assert main(["evaluate", str(run), "--tasks", "2", "--steps", "1"]) == 0
    assert {split for split, _ in seen} == {"train", "val", "test"}
    assert {images for _, images in seen} == {"nearest_strokes_0"}
    with pytest.raises(DiffoptError, match="unknown miniimagenet image preprocessing 'nearest'"):
        from diffopt.config import resolve_config

        resolve_config(dataset="miniimagenet", images="nearest")


def test_the_reseeding_splitter_draws_torchmetas_tasks(omniglot_root):
    """torchmeta constructs a numpy RandomState per class of every task (slow); diffopt's splitter
    reseeds one instead: the same indices as torchmeta's own method, for any task and seed."""
    from diffopt.data import get_dataset
    from diffopt.data.torchmeta_compat import load

    load()  # its fixes first
    from torchmeta.transforms.splitters import ClassSplitter_
    from torchmeta.utils.data.task import ConcatTask

    from diffopt.data.images import ReseedingClassSplitter

    loader = get_dataset("omniglot").loader("train", seed=3, shots=2, test_shots=5, ways=5, batch_size=1,
                                            num_tasks=1, root=str(omniglot_root))
    store, splitter = loader.dataset.store, loader.dataset.splitter
    assert type(splitter) is ReseedingClassSplitter
    rng = np.random.default_rng(0)
    for seed in rng.integers(0, 2**31, 20):
        classes = rng.choice(len(store), 5, replace=False)
        task = ConcatTask([store.dataset(int(c)) for c in classes], 5)
        splitter.seed(int(seed))
        ours = splitter.get_indices_concattask(task)
        ours_state = splitter.np_random.get_state()[1].copy()
        ClassSplitter_.seed(splitter, int(seed))
        theirs = ClassSplitter_.get_indices_concattask(splitter, task)
        assert {k: [int(i) for i in v] for k, v in ours.items()} == {
            k: [int(i) for i in v] for k, v in theirs.items()}
        assert np.array_equal(ours_state, splitter.np_random.get_state()[1])
        assert len(ours["train"]) == 10 and len(ours["test"]) == 25


def test_supervised_reptiles_class_split(omniglot_root):
    """``--class_split reptile``: every character, shuffled (seed 0) across alphabets, 1200 to
    meta-train and the rest to meta-test, none to validation; Vinyals' split is by alphabet."""
    from diffopt.config import resolve_config
    from diffopt.data import get_dataset
    from diffopt.data.images import reptile_class_split

    folder = omniglot_root / "omniglot"
    vinyals = {name: json.loads((folder / f"vinyals_{name}_labels.json").read_text())
               for name in ("train", "val", "test")}
    everything = sorted(tuple(label) for labels in vinyals.values() for label in labels)
    train, test = reptile_class_split(omniglot_root, "train"), reptile_class_split(omniglot_root, "test")
    assert len(train) == 1200 and sorted(map(tuple, train + test)) == everything
    assert reptile_class_split(omniglot_root, "train") == train  # seeded
    alphabets = {name: {label[1] for label in labels} for name, labels in vinyals.items()}
    assert len(alphabets["train"] & alphabets["test"]) <= 1  # Vinyals: by alphabet (Gurmukhi is cut)
    assert len({label[1] for label in train} & {label[1] for label in test}) > 30  # shuffled across them
    spec = get_dataset("omniglot")
    common = dict(seed=0, shots=1, test_shots=1, ways=5, batch_size=2, num_tasks=2, root=str(omniglot_root))
    loader = spec.loader("test", class_split="reptile", rotations=False, **common)
    assert len(loader.dataset.store) == len(test)
    assert next(iter(loader))["train"][0].shape == (2, 5, 1, 28, 28)
    with pytest.raises(DiffoptError, match="no validation classes"):
        spec.loader("val", class_split="reptile", **common)
    with pytest.raises(DiffoptError, match="--class_split reptile has no validation classes"):
        resolve_config(dataset="omniglot", class_split="reptile", validate_every=10)
    with pytest.raises(DiffoptError, match="unknown omniglot class split 'random'"):
        resolve_config(dataset="omniglot", class_split="random")


def test_vinyals_trainval_class_split_trains_on_the_validation_characters(omniglot_root):
    """``--class_split vinyals_trainval``: Vinyals' training and validation characters meta-train
    (1200), its test characters meta-test, nothing validates."""
    from diffopt.config import resolve_config
    from diffopt.data import get_dataset

    folder = omniglot_root / "omniglot"
    vinyals = {name: json.loads((folder / f"vinyals_{name}_labels.json").read_text())
               for name in ("train", "val", "test")}
    spec = get_dataset("omniglot")
    common = dict(seed=0, shots=1, test_shots=1, ways=5, batch_size=2, num_tasks=2, root=str(omniglot_root),
                  rotations=False)
    stores = {split: spec.loader(split, class_split="vinyals_trainval", **common).dataset.store
              for split in ("train", "test")}
    assert len(stores["train"]) == len(vinyals["train"]) + len(vinyals["val"]) == 1200
    ours, torchmetas = (next(iter(spec.loader("test", **common, **split)))
                        for split in (dict(class_split="vinyals_trainval"), {}))
    assert len(stores["test"]) == len(vinyals["test"])
    pairs = zip(ours["train"] + ours["test"], torchmetas["train"] + torchmetas["test"], strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # the same test tasks as Vinyals' split
    with pytest.raises(DiffoptError, match="vinyals_trainval class split has no validation classes"):
        spec.loader("val", class_split="vinyals_trainval", **common)
    with pytest.raises(DiffoptError, match="--class_split vinyals_trainval has no validation classes"):
        resolve_config(dataset="omniglot", class_split="vinyals_trainval", validate_every=10)


@pytest.mark.slow
def test_omniglot_table_script_trains_side_by_side_and_reports(omniglot_root, tmp_path):
    """examples/omniglot_table.py at a tiny budget: four 1-shot runs, then the table and the plot."""
    script = Path(__file__).resolve().parents[1] / "examples" / "omniglot_table.py"
    out, results, plot = tmp_path / "runs", tmp_path / "RESULTS.md", tmp_path / "curve.png"
    names = ["maml-1shot", "fomaml-1shot", "reptile-1shot", "mamlpp-1shot"]
    common = dict(capture_output=True, text=True, timeout=600)
    trained = subprocess.run([sys.executable, str(script), "train", "--table", "methods", "--runs",
                              ",".join(names), "--budget", "1", "--validate_every", "0.5",
                              "--validation_tasks", "3", "--out", str(out), "--data_root",
                              str(omniglot_root)], **common)
    assert trained.returncode == 0, trained.stderr
    for name in names:
        records = [json.loads(x) for x in (out / name / "validation.jsonl").read_text().splitlines()]
        assert records[0]["iteration"] == 0 and records[-1]["iteration"] >= 1
        assert load_checkpoint(out / name)["train_seconds"] >= 1
    assert load_trained(out / "mamlpp-1shot")[0].inner_optimizer == "lslr"
    reported = subprocess.run([sys.executable, str(script), "report", "--runs", ",".join(names),
                               "--tasks", "3", "--out", str(out), "--results", str(results),
                               "--plot", str(plot)], **common)
    assert reported.returncode == 0, reported.stderr
    table = [line for line in results.read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table[1:]] == [
        "| MAML", "| first-order MAML", "| Reptile", "| MAML++ recipe"]
    assert all(len(row.split(" | ")) == len(table[0].split(" | ")) for row in table)
    with Image.open(plot) as image:
        assert image.size[0] > 500 and len(np.unique(np.asarray(image.convert("L")))) > 10
    again = subprocess.run([sys.executable, str(script), "train", "--runs", ",".join(names),
                            "--budget", "1", "--out", str(out)], **common)
    assert again.returncode == 0 and again.stdout.count("finished") == 4  # finished runs are kept


@pytest.mark.slow
def test_omniglot_paper_table_reads_its_test_curve_off_the_snapshots(omniglot_root, tmp_path):
    """The paper table at a tiny budget: snapshots during training, each scored for the test curve,
    the minutes to 95 / 97 / 98% in the table (none reached in two seconds), the curve plotted."""
    script = Path(__file__).resolve().parents[1] / "examples" / "omniglot_table.py"
    out, results, plot = tmp_path / "runs", tmp_path / "RESULTS.md", tmp_path / "curve.png"
    common = dict(capture_output=True, text=True, timeout=600)
    trained = subprocess.run([sys.executable, str(script), "train", "--table", "paper", "--runs",
                              "paper-reptile-1shot", "--budget", "2", "--snapshot_every", "0.5",
                              "--validate_every", "1", "--validation_tasks", "3", "--out", str(out),
                              "--data_root", str(omniglot_root)], **common)
    assert trained.returncode == 0, trained.stderr
    snapshots = sorted((out / "paper-reptile-1shot" / "snapshots").glob("*.pt"))
    assert len(snapshots) >= 2
    reported = subprocess.run([sys.executable, str(script), "report", "--table", "paper", "--runs",
                               "paper-reptile-1shot", "--tasks", "4", "--curve_tasks", "3", "--out", str(out),
                               "--results", str(results), "--plot", str(plot)], **common)
    assert reported.returncode == 0, reported.stderr
    text = results.read_text()
    (head, row) = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert "minutes to 95 / 97 / 98%" in head and "| - / - / - |" in row  # two seconds reach none
    curves = sorted((out / "paper-reptile-1shot").glob("test-3-steps50-nontrans-inner_batch_size5-at*.json"))
    assert len(curves) == len(snapshots)  # each snapshot scored on the curve's tasks, as Reptile scores
    with Image.open(tmp_path / "curve-test.png") as image:
        assert image.size[0] > 500
    assert "curve-test.png" in text
