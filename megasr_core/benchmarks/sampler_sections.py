"""The samplers in the GPU suite: the host-sync-free DDPM step checked against diffusers', and the
opt-in fast presets timed with their drift from the paper's sampler.

* ``step_loop_ab`` (the suite's first timing): MegaSR with CUDA graphs at batch 1 and the
  largest batch, with diffusers' DDPM step and with the device step: the speed-up of the step
  loop alone, and whether the images are the same.
* ``ddpm_step_equality``: diffusers' ``DDPMScheduler.step`` and ``samplers.DeviceDDPM`` over a
  whole schedule on the suite's device and dtype, from the same inputs and generators: whether
  the latents are bit-identical (the largest difference otherwise), and the seconds each takes
  for the schedule's scheduler updates alone (diffusers' waits for the GPU at every step).
* ``fast_presets``: MegaSR at the suite's largest batch with CUDA graphs (how the worker serves),
  the paper's DDPM first as the reference, then each preset (``PRESETS``) at its sampler's
  default steps (``preset_steps``). Each row has its
  images/s, its speed-up over the reference and its drift from the reference's images of the
  same run: PSNR (dB) and mean absolute difference (8-bit levels), and for presets on DDPM's
  schedule the relative error of the latents after every step. Last, the fp8 rows
  (``FP8_PRESETS``) on a float8 copy of the denoiser, where the device runs fp8. Random weights: the drift
  says how far a preset moves the output, not whether it is better; ``megasr eval`` on real
  weights says that (docs/performance.md).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from megasr_core.parameters import DDPM, DPMPP_2M, FP8, FULL, UNIPC, default_steps
from megasr_core.pipelines.precision import fp8_problem, use_precision
from megasr_core.pipelines.samplers import DeviceDDPM

if TYPE_CHECKING:
    from PIL import Image

    from .gpu_suite import GPUSuite

PAPER_STEPS = 50
#: label → pipeline options (steps: the sampler's default unless given)
PRESETS: dict[str, dict[str, Any]] = {
    "ddpm_cfg_interval_0_0.5": {"sampler": DDPM, "cfg_interval": (0.0, 0.5)},
    "dpmpp_2m": {"sampler": DPMPP_2M},
    "dpmpp_2m_cfg_interval_0_0.5": {"sampler": DPMPP_2M, "cfg_interval": (0.0, 0.5)},
    "unipc": {"sampler": UNIPC},
}
#: the same, with the denoiser's linear layers in float8 (GPUs of compute capability 8.9+; the CPU)
FP8_PRESETS: dict[str, dict[str, Any]] = {
    "fp8": {},
    "fp8_dpmpp_2m_cfg_interval_0_0.5": {"sampler": DPMPP_2M, "cfg_interval": (0.0, 0.5)},
}


def preset_steps(sampler: str, suite_steps: int) -> int:
    """A sampler's steps in the suite: its default at the paper's 50 DDPM steps (25, 20), scaled
    with the suite's steps (a CPU smoke run at 1 step runs every preset at 1)."""
    return max(1, round(suite_steps * default_steps(sampler, PAPER_STEPS) / PAPER_STEPS))


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two 8-bit images of one size (inf when equal)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def drift(images: list[Image.Image], reference: list[Image.Image]) -> dict[str, float]:
    """Mean PSNR and mean absolute difference of ``images`` against ``reference``, pairwise."""
    scores = [psnr(a, b) for a, b in zip(images, reference)]
    levels = [
        float(np.mean(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
        for a, b in zip(images, reference)
    ]
    finite = [s for s in scores if math.isfinite(s)]
    return {  # PSNR over the images that differ; None (JSON null) when every one is identical
        "psnr_db": round(sum(finite) / len(finite), 2) if finite else None,
        "identical_images": len(scores) - len(finite),
        "mean_abs_diff": round(sum(levels) / len(levels), 3),
    }


def step_equality(device: torch.device, dtype: torch.dtype, base: DDPMScheduler, steps: int, batch: int) -> dict:
    """diffusers' DDPM step against ``DeviceDDPM`` over ``steps`` steps of ``batch`` 64² latents
    (``base``: the model's scheduler, whose config both copy)."""
    shape = (batch, 4, 64, 64)
    reference = DDPMScheduler.from_config(base.config)
    reference.set_timesteps(steps, device=device)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    # diffusers moves ᾱ to the device in add_noise (the pipeline's LRE start); do the same
    reference.add_noise(start, torch.zeros_like(start), reference.timesteps[:1].repeat(batch))
    eps = [torch.randn(shape, generator=torch.Generator().manual_seed(1 + i)).to(device, dtype) for i in range(steps)]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + row) for row in range(batch)]

    def diffusers_run() -> torch.Tensor:
        latents, theirs = start.clone(), generators()
        for index, t in enumerate(reference.timesteps):
            latents = reference.step(eps[index], t, latents, generator=theirs).prev_sample
        return latents

    def device_run() -> torch.Tensor:
        sampler = DeviceDDPM(DDPMScheduler.from_config(base.config), steps, generators(), shape, dtype, device)
        latents = start.clone()
        for index in range(steps):
            latents = sampler.step(index, eps[index], latents)
        return latents

    row: dict[str, Any] = {"steps": steps, "batch": batch, "dtype": str(dtype).removeprefix("torch.")}
    outputs = {}
    for name, run in (("diffusers", diffusers_run), ("device", device_run)):
        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        outputs[name] = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row[f"{name}_schedule_ms"] = round(1000 * (time.perf_counter() - began), 2)
    difference = (outputs["diffusers"].float() - outputs["device"].float()).abs().max().item()
    row["bit_identical"] = bool(torch.equal(outputs["diffusers"], outputs["device"]))
    row["max_abs_diff"] = difference
    return row


def run_step_loop_ab(suite: GPUSuite) -> dict:
    """The graphs-only A/B of the step loop, first in the suite: MegaSR with CUDA graphs at batch 1
    and the largest batch, with diffusers' DDPM step (A: a host sync per step) and with the device
    step (B), same inputs and seeds. Row B's images are A's bit for bit where the step is."""
    from megasr_core.pipelines import samplers
    from megasr_core.pipelines.acceleration import use_cuda_graphs

    pipeline = suite.pipeline
    use_cuda_graphs(pipeline)
    rows: dict[str, Any] = {}
    supported = samplers.device_ddpm_supported
    try:
        for batch in sorted({1, suite.batches[-1]}):
            images, common = suite.batch_inputs(batch)
            row: dict[str, Any] = {}
            outputs = {}
            for label, device_step in (("diffusers_step", False), ("device_step", True)):
                samplers.device_ddpm_supported = supported if device_step else (lambda scheduler: False)
                pipeline(images, num_inference_steps=2, **common)  # warm-up, graph capture
                seconds, out = suite.clock.time(lambda: pipeline(images, num_inference_steps=suite.steps, **common))
                outputs[label] = out.images
                row[label] = {"total_s": round(seconds, 4), "images_per_s": round(batch / seconds, 3)}
            row["speedup"] = round(row["diffusers_step"]["total_s"] / row["device_step"]["total_s"], 3)
            row["identical_images"] = sum(
                a.tobytes() == b.tobytes() for a, b in zip(outputs["diffusers_step"], outputs["device_step"])
            )
            row["drift"] = drift(outputs["device_step"], outputs["diffusers_step"])
            rows[str(batch)] = row
            suite._save()
    finally:
        samplers.device_ddpm_supported = supported
        use_cuda_graphs(pipeline, enabled=False)
    return rows


@contextmanager
def recorded_latents() -> Iterator[list[torch.Tensor]]:
    """The latents after every DDPM step of the runs within the block (float32 copies)."""
    latents: list[torch.Tensor] = []
    original = DeviceDDPM.step

    def recording(self, index: int, noise_pred: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        out = original(self, index, noise_pred, sample)
        latents.append(out.float().clone())
        return out

    DeviceDDPM.step = recording  # type: ignore[method-assign]
    try:
        yield latents
    finally:
        DeviceDDPM.step = original  # type: ignore[method-assign]


def step_errors(latents: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, Any]:
    """Relative error ‖x_k − x_ref,k‖ / ‖x_ref,k‖ of the latents after each step k (one schedule)."""
    errors = [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(latents, reference)]
    return {"per_step": [round(e, 5) for e in errors], "max": round(max(errors), 5), "last": round(errors[-1], 5)}


def run_fast_presets(suite: GPUSuite) -> dict:
    """The reference (DDPM at the suite's steps) and every preset, at the suite's largest batch, graphed."""
    from megasr_core.pipelines.acceleration import use_cuda_graphs

    pipeline, batch = suite.pipeline, suite.batches[-1]
    images, common = suite.batch_inputs(batch)
    use_cuda_graphs(pipeline)
    rows: dict[str, Any] = {"batch": batch}
    try:

        def row(options: dict[str, Any], seconds: float, out: list[Image.Image]) -> dict[str, Any]:
            made = {
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                "steps": preset_steps(options.get("sampler", DDPM), suite.steps),
                "total_s": round(seconds, 4),
                "images_per_s": round(batch / seconds, 3),
                "speedup_over_ddpm": round(reference_s / seconds, 3),
                **drift(out, reference),
            }
            if options.get("sampler", DDPM) == DDPM:  # the reference's schedule: comparable step by step
                made["step_relative_error"] = step_errors(trajectory(options), reference_path)
            return made

        def trajectory(options: dict[str, Any]) -> list[torch.Tensor]:
            # eagerly: a graph replay runs no Python, so nothing could record the steps
            use_cuda_graphs(pipeline, enabled=False)
            try:
                with recorded_latents() as latents:
                    pipeline(images, num_inference_steps=suite.steps, **common, **options)
            finally:
                use_cuda_graphs(pipeline)
            return latents

        def timed(options: dict[str, Any]) -> tuple[float, list[Image.Image]]:
            steps = preset_steps(options.get("sampler", DDPM), suite.steps)
            pipeline(images, num_inference_steps=2, **common, **options)  # warm-up, graph capture
            seconds, out = suite.clock.time(lambda: pipeline(images, num_inference_steps=steps, **common, **options))
            return seconds, out.images

        reference_s, reference = timed({})
        reference_path = trajectory({})  # the full-precision DDPM latents after every step
        rows["ddpm"] = {
            "steps": suite.steps,
            "total_s": round(reference_s, 4),
            "images_per_s": round(batch / reference_s, 3),
        }
        suite._save()
        for label, options in PRESETS.items():
            if suite.remaining() < suite._estimate(batch, 2):
                rows[label] = {"skipped": "budget"}
                continue
            seconds, out = timed(options)
            rows[label] = row(options, seconds, out)
            suite._save()
        problem = fp8_problem(pipeline.device)
        if problem is not None:
            rows["fp8"] = {"skipped": problem}
        elif suite.remaining() < suite._estimate(batch, 4) + 30:
            rows["fp8"] = {"skipped": "budget"}
        else:
            with fp8_copy(pipeline) as converted:
                for label, options in FP8_PRESETS.items():
                    seconds, out = timed(options)
                    rows[label] = {"converted_layers": converted, **row(options, seconds, out)}
                    suite._save()
    finally:
        use_cuda_graphs(pipeline, enabled=False)
    return rows


@contextmanager
def fp8_copy(pipeline) -> Iterator[int]:
    """The pipeline with a float8 copy of its denoiser (CUDA graphs on it); the original afterwards."""
    from megasr_core.pipelines.acceleration import use_cuda_graphs

    use_cuda_graphs(pipeline, enabled=False)  # unpins the graphs' buffers from the original's CSMs
    original = pipeline.denoiser
    pipeline.denoiser = copy.deepcopy(original)
    try:
        converted = use_precision(pipeline, FP8)
        use_cuda_graphs(pipeline)
        yield converted
    finally:
        use_cuda_graphs(pipeline, enabled=False)
        pipeline.denoiser, pipeline.precision = original, FULL
        if pipeline.device.type == "cuda":
            torch.cuda.empty_cache()
