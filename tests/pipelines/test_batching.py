"""Batches of different images: per-image seeds, prompts and scales, size buckets, per-image cancel.

The contract: an image run in a batch comes out as it does alone with the same seed and
parameters (≤ 1/255 mean absolute difference on CPU), whatever its batch mates are.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

STEPS = 2


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """Real photos at LR sizes that share the tiny pipeline's (128, 192) bucket, and one that does not."""
    return {
        "cat": Image.fromarray(data.chelsea()).resize((40, 28), Image.Resampling.BICUBIC),
        "coffee": Image.fromarray(data.coffee()).resize((41, 28), Image.Resampling.BICUBIC),
        "rocket": Image.fromarray(data.rocket()).resize((44, 30), Image.Resampling.BICUBIC),
        "astronaut": Image.fromarray(data.astronaut()).resize((28, 36), Image.Resampling.BICUBIC),
    }


class BatchSizes:
    """Records the model batch of every denoiser forward (a forward pre-hook)."""

    def __init__(self, pipeline) -> None:
        self.sizes: list[int] = []
        self.handle = pipeline.denoiser.register_forward_pre_hook(lambda _m, args: self.sizes.append(args[0].shape[0]))

    def __enter__(self) -> BatchSizes:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_buckets_group_different_sizes_and_scales(pipeline, photos):
    """Images of different LR sizes and scales share a batch when their padded work size matches."""
    cat, coffee, rocket, astro = (photos[k] for k in ("cat", "coffee", "rocket", "astronaut"))
    assert len({pipeline.geometry(im.size, s)[2] for im, s in ((cat, 4), (coffee, 2), (rocket, 4))}) == 1
    assert pipeline.geometry(astro.size, 4)[2] != pipeline.geometry(cat.size, 4)[2]
    with BatchSizes(pipeline) as calls:
        out = pipeline([cat, coffee, rocket, astro], scale=[4, 2, 4, 4], num_inference_steps=STEPS, seed=0)
    # CFG doubles the batch: one forward of 3 images per step, then one of the odd one out.
    assert calls.sizes == [6] * STEPS + [2] * STEPS
    assert [im.size for im in out.images] == [(160, 112), (82, 56), (176, 120), (112, 144)]


def test_batched_equals_solo_with_per_image_seed_prompt_and_scale(pipeline, photos):
    """Each image of a mixed batch matches its solo run with the same seed, prompt and scale."""
    images = [photos["cat"], photos["coffee"], photos["rocket"]]
    seeds, prompts, scales = [11, 22, 33], ["a cat", "", "a rocket at night"], [4, 2, 4]
    batched = pipeline(images, scale=scales, prompt=prompts, seed=seeds, num_inference_steps=STEPS)
    for i, image in enumerate(images):
        solo = pipeline(image, scale=scales[i], prompt=prompts[i], seed=seeds[i], num_inference_steps=STEPS)
        assert batched.prompts[i] == solo.prompts[0]
        assert mean_abs_diff(batched.images[i], solo.images[0]) <= 1.0, f"image {i} differs from its solo run"


def test_an_int_seed_seeds_every_image_alike(pipeline, photos):
    """seed=int gives every image its own generator with that seed: the output ignores position."""
    cat = photos["cat"]
    out = pipeline([photos["coffee"], cat], scale=[2, 4], seed=5, num_inference_steps=STEPS)
    solo = pipeline(cat, scale=4, seed=5, num_inference_steps=STEPS).images[0]
    assert mean_abs_diff(out.images[1], solo) <= 1.0
    other_seed = pipeline(cat, scale=4, seed=6, num_inference_steps=STEPS).images[0]
    assert mean_abs_diff(other_seed, solo) > 1.0


def test_per_image_prompt_changes_only_that_image(pipeline, photos, monkeypatch):
    # Without tags: the tiny byte-level tokenizer's 77 tokens would be all tags, truncating the prompt.
    monkeypatch.setattr(pipeline.extractors, "tagger", None)
    images = [photos["cat"], photos["rocket"]]
    a = pipeline(images, prompt=["", ""], seed=[1, 2], num_inference_steps=STEPS)
    b = pipeline(images, prompt=["", "a red rocket, sunset"], seed=[1, 2], num_inference_steps=STEPS)
    assert mean_abs_diff(a.images[0], b.images[0]) <= 1.0
    assert mean_abs_diff(a.images[1], b.images[1]) > 1.0
    assert "a red rocket, sunset" in b.prompts[1] and "a red rocket" not in b.prompts[0]


def test_cancelling_one_image_leaves_the_others_running(pipeline, photos):
    """is_cancelled(i) drops image i at the next step; the rest finish exactly as alone."""
    images = [photos["cat"], photos["coffee"], photos["rocket"]]
    steps_done: list[int] = []

    with BatchSizes(pipeline) as calls:
        out = pipeline(
            images,
            seed=[1, 2, 3],
            num_inference_steps=3,
            callback=lambda step, total: steps_done.append(step),
            is_cancelled=lambda index: index == 1 and len(steps_done) >= 1,
        )
    assert out.cancelled == [1] and out.images[1] is None
    assert calls.sizes == [6, 4, 4]
    assert steps_done == [1, 2, 3]
    for i in (0, 2):
        solo = pipeline(images[i], seed=i + 1, num_inference_steps=3).images[0]
        assert mean_abs_diff(out.images[i], solo) <= 1.0


def test_cancelling_every_image_returns_nothing(pipeline, photos):
    out = pipeline([photos["cat"], photos["coffee"]], num_inference_steps=2, seed=0, is_cancelled=lambda i: True)
    assert out.images == [None, None] and out.cancelled == [0, 1]


def test_each_image_keeps_its_own_prompt_when_the_batch_is_cancelled_one_by_one(pipeline, photos):
    """Image 1 is dropped after the first step, then the other two: every image still reports the
    prompt it was sampled with, not a neighbour's (the survivors' prompts once shifted onto it)."""
    images = [photos["cat"], photos["coffee"], photos["rocket"]]
    steps_done: list[int] = []
    out = pipeline(
        images,
        prompt=["first", "second", "third"],
        seed=0,
        num_inference_steps=3,
        callback=lambda step, total: steps_done.append(step),
        is_cancelled=lambda index: len(steps_done) >= (1 if index == 1 else 2),
    )
    assert out.images == [None, None, None] and out.cancelled == [0, 1, 2]
    assert steps_done == [1, 2]
    for index, word in enumerate(["first", "second", "third"]):
        assert word in out.prompts[index]
        assert all(other not in out.prompts[index] for other in {"first", "second", "third"} - {word})


def test_max_batch_size_splits_a_bucket(pipeline, photos):
    with BatchSizes(pipeline) as calls:
        pipeline([photos["cat"], photos["coffee"], photos["rocket"]], num_inference_steps=1, seed=0, max_batch_size=2)
    assert calls.sizes == [4, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": [1, 2, 3]}, "seed has 3 values for 2 images"),
        ({"prompt": ["x"]}, "prompt has 1 values for 2 images"),
        ({"scale": [4, 9]}, "scale must be a number from 1 to 8"),
        ({"seed": [1, -1]}, "seed must be an integer"),
        ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
    ],
)
def test_bad_per_image_parameters_are_refused(pipeline, photos, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline([photos["cat"], photos["coffee"]], num_inference_steps=1, **kwargs)


@pytest.fixture()
def static_batches(pipeline):
    """The pipeline padding its batches to the bucket sizes (as with CUDA graphs or compile)."""
    from megasr_core.pipelines.batching import BATCH_BUCKETS

    pipeline.batch_buckets = BATCH_BUCKETS
    yield pipeline
    pipeline.batch_buckets = None


def test_a_batch_of_three_runs_padded_to_four_and_each_image_is_as_alone(static_batches, photos):
    """Padding rows (copies of the last image, own generators) fill the model batch; the outputs are the
    three images', each as it comes out alone."""
    images = [photos["cat"], photos["coffee"], photos["rocket"]]
    with BatchSizes(static_batches) as calls:
        out = static_batches(images, scale=[4, 2, 4], num_inference_steps=STEPS, seed=[1, 2, 3])
    assert calls.sizes == [8] * STEPS  # 4 rows × the CFG halves
    assert len(out.images) == 3 and out.cancelled == []
    static_batches.batch_buckets = None
    for i, image in enumerate(images):
        alone = static_batches(image, scale=[4, 2, 4][i], num_inference_steps=STEPS, seed=i + 1).images[0]
        assert mean_abs_diff(out.images[i], alone) <= 1.0


def test_padding_respects_max_batch_size_and_is_never_cancelled(static_batches, photos):
    from megasr_core.pipelines.batching import padded_batch_size

    assert [padded_batch_size(n, (1, 2, 4, 8), None) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    assert padded_batch_size(5, (1, 2, 4, 8), 6) == 6 and padded_batch_size(3, None, None) == 3
    images = [photos["cat"], photos["coffee"], photos["rocket"]]
    with BatchSizes(static_batches) as calls:
        static_batches(images, scale=[4, 2, 4], num_inference_steps=1, seed=0, max_batch_size=3)
    assert calls.sizes == [6]  # max_batch_size 3: no room for a padding row
    asked: list[int] = []

    def cancel_all(index: int) -> bool:
        asked.append(index)
        return len(asked) > 3  # every image, from the second step on

    with BatchSizes(static_batches) as calls:
        out = static_batches(images, scale=[4, 2, 4], num_inference_steps=3, seed=0, is_cancelled=cancel_all)
    assert out.cancelled == [0, 1, 2] and out.images == [None, None, None]
    assert calls.sizes == [8]  # the padding row does not run on alone
    assert set(asked) == {0, 1, 2}  # the padding row's index is never asked about
