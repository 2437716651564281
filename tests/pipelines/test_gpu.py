"""The pipeline in fp16 on CUDA (skipped without a GPU): batched equals solo, compiled equals eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

pytestmark = pytest.mark.gpu

STEPS = 3


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.fixture(scope="module")
def cuda_pipeline():
    from megasr_core.pipelines import MegaSRPipeline

    return MegaSRPipeline.from_preset("tiny", device="cuda", torch_dtype=torch.float16)


@pytest.fixture(scope="module")
def lr_photos() -> list[Image.Image]:
    return [
        Image.fromarray(data.chelsea()).resize((40, 28), Image.Resampling.BICUBIC),
        Image.fromarray(data.coffee()).resize((41, 28), Image.Resampling.BICUBIC),
        Image.fromarray(data.rocket()).resize((44, 30), Image.Resampling.BICUBIC),
    ]


def test_batched_equals_solo_within_fp16_noise(cuda_pipeline, lr_photos):
    batched = cuda_pipeline(lr_photos, seed=[3, 4, 5], scale=[4, 2, 4], num_inference_steps=STEPS)
    for i, image in enumerate(lr_photos):
        solo = cuda_pipeline(image, seed=3 + i, scale=[4, 2, 4][i], num_inference_steps=STEPS).images[0]
        assert mean_abs_diff(batched.images[i], solo) <= 2.0, f"image {i}"


def test_cuda_graphs_equal_eager_run_after_run(lr_photos):
    """Captured and replayed steps give the eager images, also for a second conditioning."""
    from megasr_core.pipelines import MegaSRPipeline
    from megasr_core.pipelines.acceleration import use_cuda_graphs
    from tests.models.helpers import perturb_zero_init

    pipe = MegaSRPipeline.from_preset("tiny", device="cuda", torch_dtype=torch.float16)
    perturb_zero_init(pipe.denoiser)
    runs = [(lr_photos[:2], [1, 2]), ([lr_photos[1], lr_photos[0]], [5, 6])]
    eager = [pipe(images, seed=seeds, num_inference_steps=STEPS).images for images, seeds in runs]
    use_cuda_graphs(pipe)
    graphs = pipe.denoiser_graphs
    graphed = [pipe(images, seed=seeds, num_inference_steps=STEPS).images for images, seeds in runs + runs[:1]]
    assert graphs.failure is None, graphs.failure
    assert len(graphs.graphs) == 1 and graphs.graphs[next(iter(graphs.graphs))].graph is not None
    assert graphs.static_calls == 3 * (STEPS - 1)
    for want, have in zip(eager + eager[:1], graphed):
        for a, b in zip(want, have):
            assert mean_abs_diff(a, b) <= 2.0


@pytest.mark.parametrize("scope", ["blocks", "full"])
def test_compiled_equals_eager(cuda_pipeline, lr_photos, scope):
    from megasr_core.pipelines.acceleration import compile_pipeline, uncompile_pipeline

    eager = cuda_pipeline(lr_photos[:2], seed=1, num_inference_steps=STEPS).images
    torch._dynamo.reset()
    compile_pipeline(cuda_pipeline, scope=scope)
    try:
        compiled = cuda_pipeline(lr_photos[:2], seed=1, num_inference_steps=STEPS).images
    finally:
        uncompile_pipeline(cuda_pipeline)
        torch._dynamo.reset()
    for a, b in zip(eager, compiled):
        assert mean_abs_diff(a, b) <= 2.0
