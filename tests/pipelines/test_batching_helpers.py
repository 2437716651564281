"""The batching helpers of one pipeline call, without a model: buckets, generators, padding, dropped rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megasr_core.pipelines.batching import (
    BatchItem,
    RunningBatch,
    group_by_bucket,
    image_generators,
    pad_to,
    per_image,
    randn_per_image,
)


def fake_geometry(size, scale):
    """(target, work, bucket): the bucket is the LR width, so images of one width share a batch."""
    width, height = size
    return (height, width), (height, width), (width, width)


def test_images_group_by_bucket_in_first_seen_order_and_split_at_max_batch_size():
    images = [SimpleNamespace(size=(w, 8), rgb=torch.zeros(3, 8, w)) for w in (16, 24, 16, 16, 24)]
    batches = group_by_bucket(images, [1.0] * 5, fake_geometry, max_batch_size=2)
    assert [[item.index for item in batch.items] for batch in batches] == [[0, 2], [3], [1, 4]]
    assert [batch.padded for batch in batches] == [(16, 16), (16, 16), (24, 24)]
    assert len(group_by_bucket(images, [1.0] * 5, fake_geometry, max_batch_size=None)) == 2


def test_per_image_values_and_generators():
    assert per_image("scale", 4, 3) == [4, 4, 4]
    with pytest.raises(ValueError, match="scale has 2 values for 3 images"):
        per_image("scale", [1, 2], 3)
    shared = torch.Generator().manual_seed(0)
    assert image_generators(shared, None, 2) == [shared, shared]
    first, second = image_generators(None, 7, 2)
    assert torch.equal(randn_per_image((1, 4), [first]), randn_per_image((1, 4), [second]))
    with pytest.raises(ValueError, match="seed must be an integer"):
        image_generators(None, True, 1)


def test_padding_reflects_when_it_can_and_replicates_otherwise():
    image = torch.arange(6.0).reshape(1, 1, 2, 3)
    assert torch.equal(pad_to(image, (2, 3)), image)
    assert pad_to(image, (3, 4))[0, 0, 2].tolist() == [0.0, 1.0, 2.0, 1.0]  # reflect: row 0 again
    assert pad_to(image, (5, 3))[0, 0, 4].tolist() == [3.0, 4.0, 5.0]  # replicate: the last row


def test_cancelled_rows_leave_every_tensor_and_the_conditioning_cache():
    items = [BatchItem(index=i, lr=torch.zeros(3, 2, 2), target=(2, 2), work=(2, 2)) for i in (4, 5, 6)]
    rows = torch.arange(3.0)[:, None]
    run = RunningBatch(
        items,
        [torch.Generator()] * 3,
        control=rows.clone(),
        guidance={"hed": rows.clone()},
        image_tokens=rows.clone(),
        prompts=["a", "b", "c"],
        positive=rows.clone(),
        negative=rows.clone(),
        latents=rows.clone(),
        conditionings={"group": object()},
    )
    assert run.drop_cancelled(None) == [] and run.drop_cancelled(lambda index: False) == []
    assert run.conditionings  # nothing dropped, nothing recomputed
    assert run.drop_cancelled(lambda index: index == 5) == [5]
    assert [item.index for item in run.items] == [4, 6] and run.prompts == ["a", "c"] and not run.conditionings
    for tensor in (run.control, run.guidance["hed"], run.image_tokens, run.positive, run.negative, run.latents):
        assert tensor[:, 0].tolist() == [0.0, 2.0]
    assert run.drop_cancelled(lambda index: True) == [4, 6]
    assert run.items == []
