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


@pytest.mark.parametrize("batch", [1, 3])
def test_the_device_ddpm_step_is_diffusers_step_bit_for_bit_in_fp16(batch):
    """On CUDA in fp16 the device step's coefficients meet the sample in its dtype, as diffusers'
    device-side 0-d coefficients do: the same latents, bit for bit."""
    from diffusers import DDPMScheduler

    from megasr_core.models.presets import SD2_SCHEDULER
    from megasr_core.pipelines.samplers import DeviceDDPM

    device, dtype, steps, shape = torch.device("cuda"), torch.float16, 50, (batch, 4, 32, 32)
    reference = DDPMScheduler(**SD2_SCHEDULER)
    reference.set_timesteps(steps, device=device)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    reference.add_noise(start, torch.zeros_like(start), reference.timesteps[:1].repeat(batch))  # ᾱ to the device
    sampler = DeviceDDPM(
        DDPMScheduler(**SD2_SCHEDULER),
        steps,
        [torch.Generator().manual_seed(9 + r) for r in range(batch)],
        shape,
        dtype,
        device,
    )
    theirs = [torch.Generator().manual_seed(9 + r) for r in range(batch)]
    expected, got = start.clone(), start.clone()
    for index, t in enumerate(reference.timesteps):
        eps = torch.randn(shape, generator=torch.Generator().manual_seed(100 + index)).to(device, dtype)
        expected = reference.step(eps, t, expected, generator=theirs).prev_sample
        got = sampler.step(index, eps, got)
    assert torch.equal(got, expected), (got.float() - expected.float()).abs().max().item()


def test_progress_comes_from_events_in_order_and_the_host_stays_close(cuda_pipeline, lr_photos):
    """Every step is reported once, in order, after the GPU finished it; the host never queues more
    than the pacer's lookahead of steps past the last one reported."""
    from megasr_core.pipelines.step_pacing import LOOKAHEAD

    reported: list[int] = []
    launched: list[int] = []
    original = cuda_pipeline._denoise_step

    def counting(run, index, *args, **kwargs):
        launched.append(index + 1)
        assert index + 1 - (reported[-1] if reported else 0) <= LOOKAHEAD + 1
        return original(run, index, *args, **kwargs)

    cuda_pipeline._denoise_step = counting
    try:
        cuda_pipeline(lr_photos[0], seed=1, num_inference_steps=8, callback=lambda step, total: reported.append(step))
    finally:
        del cuda_pipeline._denoise_step
    assert reported == list(range(1, 9)) and launched == list(range(1, 9))


def test_padded_batches_under_graphs_give_each_image_as_alone(lr_photos):
    from megasr_core.pipelines import MegaSRPipeline
    from megasr_core.pipelines.acceleration import use_cuda_graphs

    pipe = MegaSRPipeline.from_preset("tiny", device="cuda", torch_dtype=torch.float16)
    use_cuda_graphs(pipe)
    assert pipe.batch_buckets is not None
    batched = pipe(lr_photos, seed=[3, 4, 5], scale=[4, 2, 4], num_inference_steps=STEPS)  # 3 → 4 rows
    for i, image in enumerate(lr_photos):
        solo = pipe(image, seed=3 + i, scale=[4, 2, 4][i], num_inference_steps=STEPS).images[0]
        assert mean_abs_diff(batched.images[i], solo) <= 2.0, f"image {i}"


def test_fp8_runs_on_fp8_tensor_cores_and_stays_close():
    pytest.importorskip("torchao", reason="the [fp8] extra")
    from megasr_core.pipelines import MegaSRPipeline
    from megasr_core.pipelines.precision import fp8_problem

    if fp8_problem(torch.device("cuda")) is not None:
        pytest.skip(fp8_problem(torch.device("cuda")))
    image = Image.fromarray(data.chelsea()).resize((40, 28), Image.Resampling.BICUBIC)
    full = MegaSRPipeline.from_preset("tiny", device="cuda", torch_dtype=torch.float16, seed=3)
    fp8 = MegaSRPipeline.from_preset("tiny", device="cuda", torch_dtype=torch.float16, seed=3, precision="fp8")
    a = full(image, seed=1, num_inference_steps=STEPS).images[0]
    b = fp8(image, seed=1, num_inference_steps=STEPS).images[0]
    assert 0 < mean_abs_diff(a, b) < 6
