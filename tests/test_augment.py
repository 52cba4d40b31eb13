"""refilled.data.augment: batch augmentation on the device, checked against numpy and torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from refilled.data import augment
from refilled.data.augment import Augmentation, crop_flip, eval_view, resized_crop, train_view

CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)


def stats(mean, std):
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def random_images(n, c=3, side=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8)


def variant_id(dy, dx, flipped, pad, flip=True):
    return (dy * (2 * pad + 1) + dx) * (2 if flip else 1) + int(flipped)


def numpy_crop(img: np.ndarray, dy: int, dx: int, flipped: bool, pad: int) -> np.ndarray:
    """Reference: zero-pad, slice, then mirror."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[..., ::-1] if flipped else out


def all_variants(image: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Every allowed view of one image, (V, C, H, W) uint8, in variant-id order."""
    n = (2 * pad + 1) ** 2 * (2 if flip else 1)
    return crop_flip(image.expand(n, *image.shape), torch.arange(n), pad, flip)


# ----------------------------------------------------------------------------- crop_flip

def test_augmentations_per_data_set():
    cifar = augment.for_data("CIFAR-100")
    assert (cifar.kind, cifar.pad, cifar.flip, cifar.n_variants) == ("crop_flip", 4, True, 162)
    digits = augment.for_data("digits")
    assert digits.kind == "crop_flip" and digits.flip is False and digits.n_variants == (2 * digits.pad + 1) ** 2
    digits32 = augment.for_data("digits", 32)  # CIFAR's crops at CIFAR's size, no flip
    assert (digits32.pad, digits32.flip, digits32.n_variants) == (4, False, 81)
    cub = augment.for_data("CUB-200")
    assert (cub.kind, cub.out_size, cub.flip, cub.n_variants, cub.identity_variant) == \
        ("resized_crop", 224, True, None, None)


@pytest.mark.parametrize("pad,flip", [(4, True), (1, False), (2, True)])
def test_crop_flip_explicit_variants_match_numpy(pad, flip):
    images = random_images(6, c=3, side=10, seed=pad)
    cases = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in ((0, 1) if flip else (0,))]
    for start in range(0, len(cases), 6):
        chunk = cases[start:start + 6]
        ids = torch.tensor([variant_id(dy, dx, f, pad, flip) for dy, dx, f in chunk])
        out = crop_flip(images[:len(chunk)], ids, pad, flip)
        assert out.dtype == torch.uint8 and out.shape == images[:len(chunk)].shape
        for i, (dy, dx, f) in enumerate(chunk):
            expected = numpy_crop(images[i].numpy(), dy, dx, bool(f), pad)
            np.testing.assert_array_equal(out[i].numpy(), expected, err_msg=str((dy, dx, f)))


def test_crop_flip_known_corner():
    image = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    pad = 1
    out = crop_flip(image, torch.tensor([variant_id(0, 0, False, pad)]), pad, True)[0, 0]
    # shifted down-right by one: first row and column are padding zeros
    assert out[0].tolist() == [0, 0, 0, 0] and out[:, 0].tolist() == [0, 0, 0, 0]
    assert out[1:, 1:].tolist() == image[0, 0, :3, :3].tolist()
    flipped = crop_flip(image, torch.tensor([variant_id(2, 2, True, pad)]), pad, True)[0, 0]
    assert flipped.tolist() == [[0, 7, 6, 5], [0, 11, 10, 9], [0, 15, 14, 13], [0, 0, 0, 0]]


@pytest.mark.parametrize("aug", [Augmentation("crop_flip", pad=4, flip=True), Augmentation("crop_flip", pad=1),
                                 Augmentation("crop_flip", pad=0, flip=True)])
def test_identity_variant_is_the_image(aug):
    images = random_images(5, side=12, seed=3)
    ids = torch.full((5,), aug.identity_variant)
    assert torch.equal(crop_flip(images, ids, aug.pad, aug.flip), images)


def test_sampled_crops_are_allowed_views():
    aug = Augmentation("crop_flip", pad=4, flip=True)
    images = random_images(24, seed=5)
    g = torch.Generator().manual_seed(0)
    ids = augment.sample(aug, 24, g, torch.device("cpu"))
    assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < aug.n_variants
    out = crop_flip(images, ids, aug.pad, aug.flip)
    for i in range(24):
        views = all_variants(images[i], aug.pad, aug.flip)
        matches = (views == out[i]).flatten(1).all(1)
        assert matches.any()
        assert matches[ids[i]]  # and it is the one its id names


def test_sampled_variant_ids_are_uniform():
    aug = Augmentation("crop_flip", pad=4, flip=True)
    v = aug.n_variants
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([augment.sample(aug, 10_000, g, torch.device("cpu")) for _ in range(10)])
    counts = torch.bincount(draws, minlength=v).double()
    expected = len(draws) / v
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 161 degrees of freedom: mean 161, sd ~18; a far-off distribution gives thousands
    assert chi2 < 161 + 8 * 18, chi2
    assert counts.min() > 0
    # flips are half the draws, and every offset is used
    assert abs(float((draws % 2 == 1).double().mean()) - 0.5) < 0.01


def test_sampling_is_reproducible():
    aug = Augmentation("crop_flip", pad=4, flip=True)
    a = augment.sample(aug, 100, torch.Generator().manual_seed(7), torch.device("cpu"))
    b = augment.sample(aug, 100, torch.Generator().manual_seed(7), torch.device("cpu"))
    c = augment.sample(aug, 100, torch.Generator().manual_seed(8), torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- torchvision reference

def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB")


def test_train_view_normalises_like_torchvision():
    aug = augment.for_data("CIFAR-100")
    images = random_images(3, seed=11)
    mean, std = stats(CIFAR_MEAN, CIFAR_STD)
    ours = train_view(images, aug, torch.full((3,), aug.identity_variant), mean, std)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    assert ours.dtype == torch.float32
    for i in range(3):
        torch.testing.assert_close(ours[i], reference(_pil(images[i])), rtol=0, atol=1e-5)


def test_torchvision_random_crop_flip_outputs_are_our_variants():
    aug = augment.for_data("CIFAR-100")
    image = random_images(1, seed=12)[0]
    mean, std = stats(CIFAR_MEAN, CIFAR_STD)
    ours = train_view(image.expand(aug.n_variants, -1, -1, -1), aug, torch.arange(aug.n_variants), mean, std)
    pipeline = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
    # index our variants by their pixels (uint8 bytes) to find a torchvision output among them quickly
    raw = all_variants(image, aug.pad, aug.flip)
    index = {}
    for v in range(aug.n_variants):
        index.setdefault(raw[v].numpy().tobytes(), v)
    torch.manual_seed(0)
    pil = _pil(image)
    hit = set()
    for _ in range(300):
        out = pipeline(pil)
        pixels = ((out * std[0] + mean[0]) * 255).numpy()
        assert np.abs(pixels - np.rint(pixels)).max() < 1e-3
        v = index.get(np.rint(pixels).astype(np.uint8).tobytes())
        assert v is not None, "torchvision produced a view that is not one of our variants"
        torch.testing.assert_close(ours[v], out, rtol=0, atol=1e-5)
        hit.add(v)
    assert len(hit) > 80  # and torchvision really ranges over many of them


def test_train_view_shape_and_no_mutation():
    aug = augment.for_data("digits")
    images = random_images(4, c=1, side=8, seed=2)
    before = images.clone()
    mean, std = stats((0.3,), (0.4,))
    x = train_view(images, aug, augment.sample(aug, 4, torch.Generator().manual_seed(0), torch.device("cpu")),
                   mean, std)
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(images, before)


# ----------------------------------------------------------------------------- resized crops (CUB)

def test_resized_crop_full_box_is_the_image_and_flip_mirrors():
    images = random_images(2, side=16, seed=4).float()
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
    out = resized_crop(images, full, 16)
    torch.testing.assert_close(out[0], images[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(out[1], images[1].flip(-1), rtol=0, atol=1e-3)


def test_resized_crop_quarter_boxes():
    images = random_images(2, side=16, seed=6).float()
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5, 0.0]])
    out = resized_crop(images, boxes, 8)
    torch.testing.assert_close(out[0], images[0, :, :8, :8], rtol=0, atol=1e-3)
    torch.testing.assert_close(out[1], images[1, :, 8:, 8:], rtol=0, atol=1e-3)
    # x0 is a horizontal offset, y0 a vertical one
    wide = resized_crop(images[:1], torch.tensor([[0.5, 0.0, 0.5, 0.5, 0.0]]), 8)
    torch.testing.assert_close(wide[0], images[0, :, :8, 8:], rtol=0, atol=1e-3)


def test_sampled_boxes_are_valid():
    aug = augment.for_data("CUB-200")
    boxes = augment.sample(aug, 5000, torch.Generator().manual_seed(0), torch.device("cpu"))
    x0, y0, w, h, flip = boxes.unbind(1)
    assert boxes.shape == (5000, 5)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    assert (w > 0).all() and (h > 0).all()
    area = w * h
    assert area.min() >= 0.08 * 0.74 and area.max() <= 1.0 + 1e-6
    assert set(flip.unique().tolist()) == {0.0, 1.0} and abs(float(flip.mean()) - 0.5) < 0.05


def test_train_view_resized_crop_output():
    aug = Augmentation("resized_crop", flip=True, out_size=8)
    images = random_images(3, side=12, seed=9)
    mean, std = stats(CIFAR_MEAN, CIFAR_STD)
    boxes = augment.sample(aug, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    x = train_view(images, aug, boxes, mean, std)
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]] * 3)
    x = train_view(images, Augmentation("resized_crop", flip=True, out_size=12), full, mean, std)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std, rtol=0, atol=1e-4)


def test_eval_view_centre_crop_like_torchvision():
    aug = augment.for_data("CUB-200")
    images = random_images(2, side=256, seed=10)
    mean, std = stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ours = eval_view(images, aug, mean, std)
    assert ours.shape == (2, 3, 224, 224)
    reference = transforms.Compose([transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for i in range(2):
        torch.testing.assert_close(ours[i], reference(_pil(images[i])), rtol=0, atol=1e-5)


def test_eval_view_crop_flip_is_the_normalised_image():
    aug = augment.for_data("CIFAR-100")
    images = random_images(2, seed=13)
    mean, std = stats(CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(eval_view(images, aug, mean, std), (images.float() / 255 - mean) / std)
