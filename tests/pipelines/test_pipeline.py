"""MegaSRPipeline on the tiny weights: sizes, modes, determinism, tiling, progress, cancel, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megasr_core.pipelines import InvalidImageError, PipelineCancelled
from tests.pipelines.images import exif_rotated_jpeg, png_bytes, sixteen_bit_png

FAST = {"num_inference_steps": 2, "seed": 0}


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


@pytest.mark.parametrize("size, scale", [((53, 37), 4), ((1, 1), 4), ((40, 28), 2), ((31, 17), 3.5)])
def test_output_is_exactly_w_s_by_h_s(pipeline, cat, size, scale):
    image = cat.resize(size, Image.Resampling.BICUBIC)
    out = pipeline(image, scale=scale, **FAST)
    assert out.images[0].size == (round(size[0] * scale), round(size[1] * scale))
    assert out.images[0].mode == "RGB"


def test_grayscale_input(pipeline, small_cat):
    out = pipeline(small_cat.convert("L"), **FAST)
    assert out.images[0].size == (160, 112) and out.images[0].mode == "RGB"


def test_rgba_alpha_is_preserved_and_upscaled(pipeline, small_cat):
    rgba = small_cat.convert("RGBA")
    alpha = np.zeros((28, 40), dtype=np.uint8)
    alpha[:, 20:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    out = pipeline(png_bytes(rgba), **FAST).images[0]
    assert out.mode == "RGBA" and out.size == (160, 112)
    result_alpha = np.asarray(out.getchannel("A"))
    assert result_alpha[:, :70].max() == 0 and result_alpha[:, 90:].min() == 255


def test_exif_rotated_jpeg_comes_out_upright(pipeline, small_cat):
    out = pipeline(exif_rotated_jpeg(small_cat, orientation=6), **FAST).images[0]
    assert out.size == (112, 160)


def test_sixteen_bit_png(pipeline):
    out = pipeline(sixteen_bit_png(24, 16), **FAST).images[0]
    assert out.size == (96, 64) and out.mode == "RGB"


def test_same_seed_same_output_other_seed_other_output(pipeline, small_cat):
    a = pipeline(small_cat, num_inference_steps=2, seed=7).images[0]
    b = pipeline(small_cat, num_inference_steps=2, seed=7).images[0]
    c = pipeline(small_cat, num_inference_steps=2, seed=8).images[0]
    assert np.array_equal(as_array(a), as_array(b))
    assert not np.array_equal(as_array(a), as_array(c))


def test_a_list_of_same_size_images_runs_as_one_batch(pipeline, small_cat):
    flipped = small_cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    other = small_cat.resize((30, 30))
    out = pipeline([small_cat, flipped, other], **FAST)
    assert [im.size for im in out.images] == [(160, 112), (160, 112), (120, 120)]
    assert len(out.prompts) == 3 and all(p.endswith("clean, high-resolution, 8k") for p in out.prompts)


def test_tiled_and_untiled_agree_closely(pipeline, cat):
    image = cat.resize((160, 128), Image.Resampling.BICUBIC)  # latent 80×64: fits both ways
    untiled = as_array(pipeline(image, tile_size=0, num_inference_steps=3, seed=3).images[0])
    tiled = as_array(pipeline(image, tile_size=48, tile_overlap=16, num_inference_steps=3, seed=3).images[0])
    other_seed = as_array(pipeline(image, tile_size=0, num_inference_steps=3, seed=4).images[0])
    tile_gap = np.abs(tiled - untiled).mean()
    seed_gap = np.abs(other_seed - untiled).mean()
    assert tile_gap < 0.5 * seed_gap, (tile_gap, seed_gap)


def test_a_large_image_runs_tiled(pipeline, cat):
    from megasr_core.pipelines import pipeline_megasr

    image = cat.resize((290, 170), Image.Resampling.BICUBIC)  # 1160×680 output: latent 145×85 → 2×1 tiles
    seen = []
    original = pipeline_megasr.tiles
    pipeline_megasr.tiles = lambda *args, **kwargs: seen.append(original(*args, **kwargs)) or seen[-1]
    try:
        out = pipeline(image, num_inference_steps=2, seed=0)
    finally:
        pipeline_megasr.tiles = original
    assert out.images[0].size == (1160, 680)
    assert seen and len(seen[-1]) == 2  # tiled automatically: two 96-latent tiles


def test_up_to_1024_pixels_runs_in_one_pass(pipeline, cat):
    from megasr_core.pipelines import pipeline_megasr

    seen = []
    original = pipeline_megasr.tiles
    pipeline_megasr.tiles = lambda *args, **kwargs: seen.append(original(*args, **kwargs)) or seen[-1]
    try:
        out = pipeline(cat.resize((113, 75)), num_inference_steps=1, seed=0)  # latent 97×64
    finally:
        pipeline_megasr.tiles = original
    assert out.images[0].size == (452, 300) and not seen


def test_progress_fires_once_per_step(pipeline, small_cat):
    calls = []
    pipeline(small_cat, num_inference_steps=4, seed=0, callback=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_stops_within_one_step(pipeline, small_cat):
    steps_done = []
    with pytest.raises(PipelineCancelled):
        pipeline(
            small_cat,
            num_inference_steps=10,
            seed=0,
            callback=lambda step, total: steps_done.append(step),
            should_cancel=lambda: len(steps_done) >= 3,
        )
    assert steps_done == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": 0}, "scale"),
        ({"scale": 9}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"color_fix": "sepia"}, "color_fix"),
        ({"tile_size": 5}, "tile_size"),
    ],
)
def test_bad_parameters(pipeline, small_cat, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline(small_cat, **{**FAST, **kwargs})


@pytest.mark.parametrize(
    "payload, message",
    [(b"not an image at all", "not an image"), (b"", "empty"), ("truncated", "truncated")],
)
def test_bad_images(pipeline, small_cat, payload, message):
    if payload == "truncated":
        payload = png_bytes(small_cat)[:150]
    with pytest.raises(InvalidImageError, match=message):
        pipeline(payload, **FAST)


def test_save_pretrained_round_trip(pipeline, small_cat, tmp_path):
    from megasr_core.pipelines import MegaSRPipeline

    pipeline.save_pretrained(tmp_path / "copy")
    again = MegaSRPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    a = pipeline(small_cat, **FAST).images[0]
    b = again(small_cat, **FAST).images[0]
    assert np.array_equal(as_array(a), as_array(b))


def test_cached_and_recomputed_tile_modulation_agree(pipeline, cat):
    image = cat.resize((160, 128), Image.Resampling.BICUBIC)
    cached = as_array(pipeline(image, tile_size=48, tile_overlap=16, num_inference_steps=2, seed=5).images[0])
    fresh = as_array(
        pipeline(image, tile_size=48, tile_overlap=16, num_inference_steps=2, seed=5, max_cached_tiles=0).images[0]
    )
    assert np.abs(cached - fresh).max() <= 1.0  # identical up to float rounding of 8-bit output


def test_tiles_run_in_batches_with_the_same_result(pipeline, cat):
    """tile_batch_size stacks same-shape tiles in one model batch; the blend is unchanged."""
    image = cat.resize((160, 128), Image.Resampling.BICUBIC)  # latent 80×64 → 48-latent tiles: 2×2
    sizes = []
    handle = pipeline.denoiser.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        kwargs = {"tile_size": 48, "tile_overlap": 16, "num_inference_steps": 2, "seed": 6}
        one = as_array(pipeline(image, tile_batch_size=1, **kwargs).images[0])
        one_sizes, sizes[:] = list(sizes), []
        four = as_array(pipeline(image, tile_batch_size=4, **kwargs).images[0])
    finally:
        handle.remove()
    assert one_sizes == [2] * 8 and sizes == [8] * 2  # 4 tiles × CFG pair, per step
    assert np.abs(one - four).mean() <= 1.0
