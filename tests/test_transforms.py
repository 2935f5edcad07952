"""Device-side transforms: normalisation over brain pixels, padding that crops back exactly, consistent augmentation."""

from __future__ import annotations

import torch

from trainer.data.transforms import augment, crop, normalise, pad, padding_for, random_crop


def _brain_batch() -> torch.Tensor:
    x = torch.zeros(2, 3, 240, 240, dtype=torch.int16)
    x[:, :, 60:180, 50:190] = torch.randint(100, 900, (2, 3, 120, 140), dtype=torch.int16)
    return x


def test_zscore_over_brain_pixels_keeps_background_zero() -> None:
    x = _brain_batch()
    y = normalise(x, "zscore")
    brain = x != 0
    assert torch.all(y[~brain] == 0)
    for b in range(2):
        for c in range(3):
            values = y[b, c][brain[b, c]]
            assert abs(values.mean().item()) < 1e-4
            assert abs(values.std(unbiased=False).item() - 1) < 1e-3


def test_minmax_scales_to_the_slice_maximum() -> None:
    x = _brain_batch()
    y = normalise(x, "minmax")
    assert torch.allclose(y.amax(dim=(-2, -1)), torch.ones(2, 3))


def test_pad_then_crop_is_identity() -> None:
    padding = padding_for(240, 240)
    assert padding == (8, 8, 8, 8)
    x = torch.randn(2, 4, 240, 240)
    padded = pad(x, padding)
    assert padded.shape[-2:] == (256, 256)
    assert torch.equal(crop(padded, padding), x)
    assert padding_for(256, 224) == (0, 0, 0, 0)


def test_augmentation_moves_labels_with_images() -> None:
    labels = torch.randint(0, 4, (8, 64, 64))
    images = labels[:, None].float().repeat(1, 2, 1, 1) + 1  # image encodes its own label map
    generator = torch.Generator().manual_seed(0)
    aug_images, aug_labels = augment(images, labels, generator)
    changed = (aug_labels != labels).any()
    assert changed  # something was flipped or rotated
    ratio = aug_images[:, 0] / (aug_labels + 1).float()
    # only a per-sample intensity jitter separates image from label: the geometry moved both alike
    assert torch.allclose(ratio, ratio[:, :1, :1].expand_as(ratio), atol=0.15)


def test_random_crop_is_tumour_centred_mostly() -> None:
    labels = torch.zeros(30, 240, 240, dtype=torch.long)
    labels[:, 200:210, 20:30] = 2
    images = labels[:, None].float()
    _, crops = random_crop(images, labels, 64, torch.Generator().manual_seed(1))
    assert crops.shape == (30, 64, 64)
    with_tumour = (crops > 0).flatten(1).any(1).float().mean()
    assert with_tumour > 0.5


def test_random_crop_cuts_the_same_window_from_images_and_labels() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (6, 96, 80))
    labels[2] = 0  # a slice without tumour: cropped anywhere
    images = torch.stack([labels * 10 + c for c in range(2)], 1).float()  # channel c: 10 * label + c
    crops, crop_labels = random_crop(images, labels, 32, generator)
    assert crops.shape == (6, 2, 32, 32) and crop_labels.shape == (6, 32, 32)
    for c in range(2):
        assert torch.equal(crops[:, c], crop_labels.float() * 10 + c)
    for i in range(6):  # each crop is a window of its own slice
        windows = labels[i].unfold(0, 32, 1).unfold(1, 32, 1)
        assert (windows == crop_labels[i]).flatten(2).all(-1).any()
