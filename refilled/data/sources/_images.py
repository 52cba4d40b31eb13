"""Image files decoded into uint8 arrays: what the sources that read folders of images share."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np
from PIL import Image

from refilled.data.sources._base import one_line
from refilled.errors import UserError


def square_rgb(path: Path, size: int) -> np.ndarray:
    """Decode one image to RGB (grey, palette and RGBA too), shorter side -> size, centre crop
    size x size; CHW uint8. Mirrors torchvision's Resize(size) + CenterCrop(size) on PIL images."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        # The shorter side becomes exactly `size`; the longer one is truncated like torchvision.
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        img = img.resize((new_w, new_h), Image.BILINEAR)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_all(paths: list[Path], size: int, desc: str, remedy: str = "replace or remove it") -> np.ndarray:
    """Decode images into one preallocated (N, 3, size, size) array with a thread pool; an
    unreadable image is a one-line UserError naming it and `remedy`.

    PIL releases the GIL while decoding and resizing, so threads scale; filling a
    preallocated array avoids holding a second copy of the whole set.
    """
    from tqdm import tqdm

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def work(i: int) -> None:
        try:
            out[i] = square_rgb(paths[i], size)
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # missing, unreadable or corrupt
            raise UserError(f"cannot read image {paths[i]} ({one_line(err)}): {remedy}") from None

    workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, i) for i in range(len(paths))]
        try:
            with tqdm(total=len(paths), desc=desc, unit="img", disable=len(paths) < 100) as bar:
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()  # re-raises the first UserError
                    bar.update(1)
        except BaseException:
            for fut in futures:  # don't decode thousands more images before reporting it
                fut.cancel()
            raise
    return out


def is_image(path: Path) -> bool:
    """Whether Pillow can read the file as an image (a header check: cheap)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # Pillow raises many kinds for a file that is no image
        return False
