"""A generated Mini-ImageNet distribution in its standard format (images/*.jpg and the Ravi &
Larochelle {split}.csv files), for the tests and benchmarks of its prepare -> loader path where
the real one is not at hand: each class a colour with pixel noise, so classes are learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ODD_SIZE = (100, 90)
"""The first image of each split is stored at this size, as some copies of the distribution are
not all 84x84."""


def make_distribution(folder: Path, classes: dict[str, int], images_per_class: int,
                      seed: int = 0) -> dict[str, dict[str, list[Path]]]:
    """Write ``folder/images/*.jpg`` and ``folder/{split}.csv`` with ``classes[split]`` classes of
    ``images_per_class`` JPEG images each; returns split -> class -> image paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    layout: dict[str, dict[str, list[Path]]] = {}
    wnid = 1000000
    for split, count in classes.items():
        rows, layout[split] = ["filename,label"], {}
        for _ in range(count):
            wnid += 1
            label = f"n{wnid:08d}"
            colour = rng.integers(0, 256, size=3)
            layout[split][label] = []
            for index in range(images_per_class):
                odd = index == 0 and not rows[1:]
                size = ODD_SIZE if odd else (84, 84)
                noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                name = f"{label}{index + 1:08d}.jpg"
                Image.fromarray(pixels).save(folder / "images" / name, quality=95)
                layout[split][label].append(folder / "images" / name)
                rows.append(f"{name},{label}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return layout
