"""The canvas rule shared by the API and the pipeline, and the bound both enforce with it."""

from __future__ import annotations

import pytest
from PIL import Image

from megasr_core.geometry import (
    DEFAULT_MAX_OUTPUT_PIXELS,
    MIN_WORK_SIDE,
    SD2_SIZE_MULTIPLE,
    AspectRatioError,
    Canvas,
    WorkBoundsError,
    canvas,
    check_work_bounds,
)


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [
        # a short side below 512 after scaling is enlarged to 512 (SeeSR); the bucket pads to 64
        ((24, 16), 4, Canvas(target=(64, 96), work=(512, 768), bucket=(512, 768))),
        ((1000, 600), 2, Canvas(target=(1200, 2000), work=(1200, 2000), bucket=(1216, 2048))),
        ((300, 200), 1.5, Canvas(target=(300, 450), work=(512, 768), bucket=(512, 768))),
        # the probe that killed a worker: an 83-byte 1×4096 PNG
        ((4096, 1), 1, Canvas(target=(1, 4096), work=(512, 2_097_152), bucket=(512, 2_097_152))),
    ],
)
def test_canvas(size, scale, expected):
    assert canvas(size, scale, SD2_SIZE_MULTIPLE) == expected


def test_a_model_with_a_smaller_native_size_enlarges_to_its_own_minimum():
    assert canvas((24, 16), 4, 64, min_side=128) == Canvas(target=(64, 96), work=(128, 192), bucket=(128, 192))
    assert canvas((24, 16), 8, 64, min_side=128) == Canvas(target=(128, 192), work=(128, 192), bucket=(128, 192))
    with pytest.raises(WorkBoundsError, match=r"192×128 = 24,576 pixel canvas \(short side enlarged to 128\)"):
        check_work_bounds((24, 16), 1, 64, 20_000, min_side=128)
    with pytest.raises(ValueError, match="minimum working side"):
        canvas((24, 16), 1, 64, min_side=0)


def test_the_sd2_multiple_is_the_vae_factor_times_the_unet_downsampling():
    assert SD2_SIZE_MULTIPLE == 8 * 2 ** (4 - 1)


def test_output_bound_is_inclusive():
    limit = 4096 * 4096
    assert check_work_bounds((1024, 1024), 4, SD2_SIZE_MULTIPLE, limit).target == (4096, 4096)
    with pytest.raises(WorkBoundsError, match=r"4100×4096 = 16,793,600 pixel output; the limit is 16,777,216") as err:
        check_work_bounds((1025, 1024), 4, SD2_SIZE_MULTIPLE, limit)
    assert err.value.code == "work_too_large" and err.value.setting == "max_output_pixels" and err.value.limit == limit


def test_scale_8_of_a_2048_square_is_refused():
    with pytest.raises(WorkBoundsError, match="16384×16384"):
        check_work_bounds((2048, 2048), 8, SD2_SIZE_MULTIPLE, 4096 * 4096)


def test_the_working_canvas_is_bounded_even_when_the_output_is_small():
    """1×4096 at scale 1 is a 4096-pixel output but a 512 × 2,097,152 canvas."""
    with pytest.raises(WorkBoundsError, match=r"2097152×512 = 1,073,741,824 pixel canvas") as err:
        check_work_bounds((4096, 1), 1, SD2_SIZE_MULTIPLE, 4096 * 4096)
    assert type(err.value) is WorkBoundsError


def test_aspect_ratio_bound_is_inclusive_and_checked_first():
    assert check_work_bounds((16, 1), 1, SD2_SIZE_MULTIPLE, 10**10, max_aspect_ratio=16)
    with pytest.raises(AspectRatioError, match=r"4096×1, a side ratio of 4096:1; the limit is 16:1") as err:
        check_work_bounds((4096, 1), 1, SD2_SIZE_MULTIPLE, 4096 * 4096, max_aspect_ratio=16)
    assert err.value.code == "aspect_ratio" and err.value.setting == "max_aspect_ratio"
    assert isinstance(err.value, ValueError)
    with pytest.raises(AspectRatioError):
        check_work_bounds((1, 17), 1, SD2_SIZE_MULTIPLE, 10**10, max_aspect_ratio=16)


def test_geometry_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, megasr_core.geometry; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the pipeline


def test_pipeline_geometry_is_the_shared_rule(pipeline):
    # the UNet's native resolution: sample size 16 × VAE factor 8 for the tiny preset (64 × 8 = 512 for SD2)
    assert pipeline.min_work_side == pipeline.denoiser.unet.config.sample_size * pipeline.vae_scale_factor == 128
    for size, scale in (((24, 16), 4), ((451, 300), 2), ((40, 28), 2.5), ((700, 9), 1)):
        sizes = canvas(size, scale, pipeline.size_multiple, min_side=128)
        assert pipeline.geometry(size, scale) == (sizes.target, sizes.work, sizes.bucket)


def test_native_side_is_the_unets_sample_size_in_pixels():
    from megasr_core.pipelines.pipeline_megasr import native_side

    assert native_side(64, 8) == 512  # SD2-base, SeeSR, SeeSR-Turbo
    assert native_side((96, 64), 8) == 512  # a non-square sample size: its short side
    assert native_side(None, 8) == MIN_WORK_SIDE == 512  # a config without one: SD2's rule


class Forwards:
    def __init__(self, pipeline) -> None:
        self.count = 0
        self.handle = pipeline.denoiser.register_forward_pre_hook(self._count)

    def _count(self, _module, _args) -> None:
        self.count += 1


def test_pipeline_refuses_work_over_its_bound_before_running_the_model(pipeline):
    assert pipeline.max_output_pixels == DEFAULT_MAX_OUTPUT_PIXELS
    image = Image.new("RGB", (8, 8), "gray")
    forwards = Forwards(pipeline)
    try:
        # an 8×8 input runs on the tiny model's 128×128 minimum canvas: over a 100×100 bound, whatever the scale
        with pytest.raises(WorkBoundsError, match="128×128 = 16,384 pixel canvas"):
            pipeline(image, scale=2, num_inference_steps=1, seed=0, max_output_pixels=100 * 100)
        pipeline.max_output_pixels = 100 * 100
        with pytest.raises(WorkBoundsError):
            pipeline(image, scale=2, num_inference_steps=1, seed=0)
    finally:
        pipeline.max_output_pixels = DEFAULT_MAX_OUTPUT_PIXELS
        forwards.handle.remove()
    assert forwards.count == 0
    out = pipeline(image, scale=2, num_inference_steps=1, seed=0, max_output_pixels=128 * 128)  # at the bound: runs
    assert out.images[0].size == (16, 16)
