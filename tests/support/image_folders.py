"""Image folders in torchvision's ImageFolder layout, written by the tests: PNG and JPEG,
grey, RGB and RGBA, of mixed sizes; each class a distinct colour so a model can learn it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30), (200, 40, 210), (30, 210, 220)]


def write_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size: tuple[int, int],
                mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = rng.integers(-25, 26, (size[1], size[0], 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def write_folder(root: Path, classes: list[str], per_class: int = 6, test_per_class: int | None = 3,
                 seed: int = 0) -> Path:
    """root/train/<class>/ (and root/test/<class>/ unless test_per_class is None): a mix of
    PNG and JPEG, every third image grey and one RGBA a class, sizes between 12 and 40 px."""
    rng = np.random.default_rng(seed)
    parts = [("train", per_class)] + ([("test", test_per_class)] if test_per_class is not None else [])
    for part, n in parts:
        for c, name in enumerate(classes):
            for i in range(n):
                mode = "L" if i % 3 == 2 else ("RGBA" if i == 1 else "RGB")
                suffix = ".jpg" if i % 2 and mode != "RGBA" else ".png"
                size = (int(rng.integers(12, 41)), int(rng.integers(12, 41)))
                write_image(root / part / name / f"{name}_{i}{suffix}", COLOURS[c % len(COLOURS)], rng, size, mode)
    return root
