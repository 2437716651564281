"""The whole-pipeline benchmark behind ``megasr bench pipeline``: per-stage times on random weights.

Builds a preset with random weights (nothing downloaded), upscales a real photo (scikit-image's
astronaut when installed, else random pixels) once to warm up and once measured with the GPU
synchronized between stages, and reports the stage times, the median denoising step, the
total, images per second and peak memory. With ``batch`` > 1 it also times ``batch`` single-image
runs in the same process and reports the batch's throughput over theirs (``batch_speedup``).
"""

from __future__ import annotations

import platform
import resource
import time

import torch
from PIL import Image


def _photo(side: int) -> Image.Image:
    try:
        from skimage import data

        photo = Image.fromarray(data.astronaut())
    except ImportError:  # scikit-image is a dev dependency
        photo = Image.fromarray((torch.rand(512, 512, 3) * 255).byte().numpy())
    return photo.resize((side, side), Image.Resampling.BICUBIC)


def run_pipeline_benchmark(
    preset: str = "tiny",
    size: int = 512,
    scale: int = 4,
    steps: int = 50,
    batch: int = 1,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    with_extractors: bool = True,
    guidance_scale: float = 5.5,
) -> dict:
    from megasr_core.pipelines import MegaSRPipeline

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    start = time.perf_counter()
    pipeline = MegaSRPipeline.from_preset(preset, device=dev, torch_dtype=dtype, with_extractors=with_extractors)
    build_s = time.perf_counter() - start
    images = [_photo(max(1, size // scale))] * batch
    pipeline(images, scale=scale, num_inference_steps=2, guidance_scale=guidance_scale, seed=0)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    out = pipeline(images, scale=scale, num_inference_steps=steps, guidance_scale=guidance_scale, seed=0, profile=True)
    total = out.timings["total"]
    singles_s = None
    if batch > 1:
        singles_s = 0.0
        for index in range(batch):
            singles_s += pipeline(
                images[index],
                scale=scale,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                seed=0,
                profile=True,
            ).timings["total"]
    result = {
        "benchmark": "pipeline",
        "preset": preset,
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "input_size": images[0].size[0],
        "output_size": out.images[0].size[0],
        "batch": batch,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "extractors": with_extractors,
        "build_s": round(build_s, 3),
        "stages_s": {k: v for k, v in out.timings.items() if k not in ("total", "denoise_step_median")},
        "denoise_step_median_s": out.timings.get("denoise_step_median"),
        "total_s": total,
        "seconds_per_image": round(total / batch, 4),
        "images_per_s": round(batch / total, 4),
    }
    if singles_s is not None:
        result["single_image_runs_s"] = round(singles_s, 4)
        result["batch_speedup"] = round(singles_s / total, 3)  # batch throughput ÷ one-at-a-time throughput
    if dev.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return result
