"""Every extractor on real photos: shapes, dtypes and value ranges at the input's size."""

from __future__ import annotations

import pytest
import torch

from megasr_core.extractors import class_palette

PHOTOS = ["rgb", "gray", "odd", "pixel", "batch"]


@pytest.mark.parametrize("photo", PHOTOS)
@torch.no_grad()
def test_maps_match_the_input_size_and_range(tiny_extractors, photos, photo):
    images = photos[photo]
    batch, _, height, width = images.shape
    out = tiny_extractors(images)
    for name, channels in (("hed", 1), ("depth", 1), ("seg", 3)):
        value = getattr(out, name)
        assert value.shape == (batch, channels, height, width), name
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
        assert value.min() >= 0 and value.max() <= 1, name
    assert out.image_tokens.shape == (batch, 17, 32)
    assert len(out.tags) == batch
    assert set(out.maps()) == {"hed", "depth", "seg"}


@pytest.mark.parametrize("photo", ["rgb", "odd", "batch"])
@torch.no_grad()
def test_depth_is_scaled_per_image_to_the_full_range(tiny_extractors, photos, photo):
    depth = tiny_extractors.depth(photos[photo])
    for single in depth:
        assert single.min().item() == 0.0 and single.max().item() == pytest.approx(1.0)


@torch.no_grad()
def test_depth_keeps_the_models_order_near_is_one(tiny_extractors, photos):
    """Depth-Anything predicts inverse depth (large = near): the largest value maps to 1."""
    extractor = tiny_extractors.depth
    images = photos["rgb"]
    raw = extractor.predict(extractor.preprocess(images)).unsqueeze(1)
    raw = torch.nn.functional.interpolate(raw, size=images.shape[-2:], mode="bilinear", antialias=True)
    out = extractor(images)
    assert torch.equal(out.flatten().argmax(), raw.flatten().argmax())
    assert torch.equal(out.flatten().argmin(), raw.flatten().argmin())


@torch.no_grad()
def test_segmentation_paints_classes_with_the_palette(tiny_extractors, photos):
    extractor = tiny_extractors.segmentation
    labels = extractor.class_map(photos["rgb"])
    assert labels.shape == (1, 512, 512) and labels.dtype == torch.long
    assert 0 <= labels.min() and labels.max() < 150
    seg = extractor(photos["rgb"])
    palette = class_palette(150)
    assert torch.equal(seg[0].permute(1, 2, 0), palette[labels[0]])


def test_palette_colours_are_distinct_and_in_range():
    palette = class_palette(150)
    assert palette.shape == (150, 3)
    assert len({tuple(c) for c in palette.tolist()}) == 150
    assert palette.min() >= 0 and palette.max() <= 1
    assert not (palette == 0).all(dim=1).any()  # black stays "no map"


@torch.no_grad()
def test_batched_equals_one_by_one(tiny_extractors, photos):
    images = photos["batch"]
    together = tiny_extractors(images)
    for index in range(images.shape[0]):
        alone = tiny_extractors(images[index : index + 1])
        for name in ("hed", "depth", "seg", "image_tokens"):
            assert torch.allclose(getattr(alone, name)[0], getattr(together, name)[index], atol=1e-4), name
        assert alone.tags[0] == together.tags[index]


@torch.no_grad()
def test_extractors_can_be_switched_off(tiny_extractors, photos):
    out = tiny_extractors(photos["odd"], enabled=["hed", "clip"])
    assert out.hed is not None and out.image_tokens is not None
    assert out.depth is None and out.seg is None and out.tags is None
    assert set(out.maps()) == {"hed"}
    with pytest.raises(ValueError, match="unknown extractors"):
        tiny_extractors(photos["odd"], enabled=["normals"])


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(1, 2, 8, 8), "3 \\(RGB\\) or 1 \\(grayscale\\) channels, got 2"),
        (torch.rand(1, 4, 8, 8), "got 4"),
        (torch.rand(1, 3, 8, 8) * 2, "values in \\[0, 1\\]"),
        (torch.rand(1, 3, 8, 8) - 0.5, "values in \\[0, 1\\]"),
        (torch.full((1, 3, 8, 8), float("nan")), "values in \\[0, 1\\]"),
        (torch.rand(0, 3, 8, 8), "empty batch"),
        (torch.rand(3, 8, 8), "B×C×H×W"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_input_is_a_clear_value_error(tiny_extractors, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_extractors(images)
    for name in ("hed", "depth", "segmentation", "clip"):
        with pytest.raises(ValueError, match=message):
            getattr(tiny_extractors, name)(images)


def test_all_extractors_on_one_batch_read_its_range_back_once(tiny_extractors, photos, monkeypatch):
    """Reading the value range back waits for the GPU: the extractors run on one batch check it once,
    not once each; each extractor called alone still checks."""
    calls: list[int] = []
    real = torch.aminmax

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting)
    tiny_extractors(photos["odd"])
    assert len(calls) == 1
    tiny_extractors.hed(photos["odd"])
    assert len(calls) == 2
