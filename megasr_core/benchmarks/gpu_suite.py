"""The GPU benchmark suite: one process, one JSON, everything issue #10 asks to be measured.

    megasr bench gpu --output gpu_suite.json           # on a GPU: sd2-base, 512², 50 steps
    megasr bench gpu --preset tiny --size 128 --steps 2 --batches 1,2 --device cpu

On random weights of the preset (nothing downloaded) it measures, in this order:

1. ``baseline``: plain diffusers SD2 UNet + ControlNet (no CSM, no MSFM, no extractors), the
   same VAE and text encoder, the same shapes and CFG, for every batch size;
2. ``megasr_eager``: the whole MegaSR pipeline (extractors, tagger, CSM, MSFM, colour fix) at
   every batch size, with per-stage times, and its ratio to the baseline; ``denoiser_breakdown``:
   one CFG denoiser step with neither, either or both of CSM and MSFM active;
3. ``megasr_cuda_graphs``: the same with the denoiser step replayed from CUDA graphs;
   ``cudnn_benchmark``: eager at the largest batch and graphs at batch 1 and the largest, with
   cuDNN's convolution autotuner on;
4. ``seesr_eager``, ``seesr_cuda_graphs``, ``seesr_turbo_eager``, ``seesr_turbo_cuda_graphs``:
   the paper's baseline SeeSR (at the suite's steps and CFG) and SeeSR-Turbo (2 steps, no CFG) at
   batch 1 and the largest batch, eager and with CUDA graphs (``family_sections``), before the
   long sections so that a budget cut still leaves them measured;
5. ``megasr_large``: one ``large``² output (latent tiling and tiled VAE), with peak memory;
6. ``megasr_compiled_<scope>``: the same per compile scope (``full``, ``blocks``; ``full+graphs``
   adds CUDA graphs on top of the compiled code), with compile time;
7. ``megasr_channels_last``: eager with NHWC convolutions at the largest batch.

``sections`` picks some of them by name (``build`` always runs). Sections run while ``budget_s``
lasts (each estimated from what ran before it); a section that fails records its error and the
rest go on. With ``output`` the JSON is rewritten after each section, so a run cut short still
leaves what it measured.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .family_sections import FAMILY_SECTIONS, FamilyBench, family_summary
from .sampler_sections import run_fast_presets, run_step_loop_ab, step_equality
from .worker_overhead import run_worker_overhead

if TYPE_CHECKING:
    from megasr_core.pipelines import MegaSRPipeline

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # in scikit-image's wheel on every version


def _photos(count: int, side: int) -> list[Image.Image]:
    """``count`` different real photos (scikit-image; mirrored and rotated for more), ``side``² each."""
    bases = []
    try:
        from skimage import data

        for name in PHOTOS:
            try:
                bases.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
            except Exception:  # a data file that this scikit-image would have to download
                continue
    except ImportError:  # scikit-image is a dev dependency
        pass
    if not bases:  # random pixels time the same
        generator = torch.Generator().manual_seed(0)
        bases = [Image.fromarray((torch.rand(side, side, 3, generator=generator) * 255).byte().numpy())]
    variants = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180)
    images = []
    for i in range(count):
        photo = bases[i % len(bases)]
        edge = min(photo.size)
        left, top = (photo.size[0] - edge) // 2, (photo.size[1] - edge) // 2
        photo = photo.crop((left, top, left + edge, top + edge))
        variant = variants[(i // len(bases)) % len(variants)]
        if variant is not None:
            photo = photo.transpose(variant)
        images.append(photo.resize((side, side), Image.Resampling.BICUBIC))
    return images


def _versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "diffusers", "transformers", "triton", "peft", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "versions": _versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


class _Clock:
    """Wall time with the device synchronized, and peak memory per measured region."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # process RSS on CPU

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        value = fn()
        self.sync()
        return time.perf_counter() - start, value


# ---------------------------------------------------------------------------- baseline
class PlainSD2ControlNet:
    """Plain diffusers SD2 + ControlNet sampling of the same shapes: the cost MegaSR adds to.

    Text encoding, VAE encode of the condition, ``steps`` DDPM steps with CFG through an
    unmodified ``ControlNetModel`` + ``UNet2DConditionModel``, VAE decode.
    """

    def __init__(self, preset: str, pipeline, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

        from megasr_core.models import get_preset

        spec = get_preset(preset)
        with torch.device(device):
            self.unet = UNet2DConditionModel(**spec.unet)
            self.controlnet = ControlNetModel.from_unet(
                self.unet, conditioning_embedding_out_channels=spec.controlnet_conditioning_channels
            )
        self.unet.to(dtype).eval().requires_grad_(False)
        self.controlnet.to(dtype).eval().requires_grad_(False)
        self.scheduler = DDPMScheduler(**spec.scheduler)
        self.pipeline = pipeline  # for the shared VAE, text encoder and tokenizer
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(
        self, control: torch.Tensor, steps: int, guidance_scale: float, step_times: list[float] | None = None
    ) -> torch.Tensor:
        p, batch = self.pipeline, control.shape[0]
        text = p._encode_text(["a photo, clean, high-resolution, 8k"] * batch)
        if guidance_scale > 1:
            text = torch.cat([p._encode_text(["dotted, noise, blur, lowres, smooth"] * batch), text])
        latents = p.vae.encode(control.to(self.dtype) * 2 - 1).latent_dist.mean * p.vae.config.scaling_factor
        self.scheduler.set_timesteps(steps, device=self.device)
        latents = self.scheduler.add_noise(
            latents, torch.randn_like(latents), self.scheduler.timesteps[:1].repeat(batch)
        )
        cond = torch.cat([control, control]) if guidance_scale > 1 else control
        for t in self.scheduler.timesteps:
            start = time.perf_counter()
            latent_in = torch.cat([latents, latents]) if guidance_scale > 1 else latents
            down, mid = self.controlnet(
                latent_in, t, encoder_hidden_states=text, controlnet_cond=cond.to(self.dtype), return_dict=False
            )
            eps = self.unet(
                latent_in,
                t,
                encoder_hidden_states=text,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
            if guidance_scale > 1:
                uncond, positive = eps.chunk(2)
                eps = uncond + guidance_scale * (positive - uncond)
            latents = self.scheduler.step(eps, t, latents).prev_sample
            if step_times is not None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_times.append(time.perf_counter() - start)
        return p.vae.decode(latents / p.vae.config.scaling_factor).sample


# ---------------------------------------------------------------------------- the suite
class GPUSuite:
    def __init__(
        self,
        preset: str = "sd2-base",
        size: int = 512,
        scale: int = 4,
        steps: int = 50,
        guidance_scale: float = 5.5,
        batches: Sequence[int] = (1, 4, 8),
        scopes: Sequence[str] = ("full+graphs", "blocks"),
        large: int | None = 2048,
        single_repeats: int = 3,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        budget_s: float = 420.0,
        output: str | Path | None = None,
        log: Callable[[str], None] | None = None,
        sections: Sequence[str] | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.preset, self.size, self.scale, self.steps = preset, size, scale, steps
        self.guidance_scale, self.batches, self.scopes = guidance_scale, sorted(set(batches)), list(scopes)
        self.large, self.single_repeats = large, single_repeats
        self.deadline = time.perf_counter() + budget_s
        self.only = set(sections) | {"build"} if sections else None
        self.output = Path(output) if output else None
        self.log = log or (lambda message: None)
        self.clock = _Clock(self.device)
        self.result: dict[str, Any] = {
            "benchmark": "gpu_suite",
            "environment": environment(self.device),
            "settings": {
                "preset": preset,
                "output_size": size,
                "input_size": size // scale,
                "scale": scale,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "batches": self.batches,
                "compile_scopes": self.scopes,
                "large_output_size": large,
                "dtype": str(self.dtype).replace("torch.", ""),
                "budget_s": budget_s,
                "single_repeats": single_repeats,
                "weights": "random (timing only)",
            },
            "sections": {},
            "errors": {},
            "skipped": [],
        }
        self.pipeline = None
        self.baseline: PlainSD2ControlNet | None = None
        self._per_image_step_s: float | None = None  # eager estimate, for the budget

    # -------------------------------------------------------------- bookkeeping
    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def _save(self) -> None:
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(self.result, indent=2))

    def section(self, name: str, fn: Callable[[], Any], estimate_s: float = 0.0) -> None:
        if self.only is not None and name not in self.only:
            return
        if self.remaining() < estimate_s:
            self.result["skipped"].append(
                {"section": name, "reason": f"budget: ~{estimate_s:.0f} s needed, {self.remaining():.0f} s left"}
            )
            self.log(f"[suite] skip {name} (budget)")
            self._save()
            return
        self.log(f"[suite] {name} ({self.remaining():.0f} s left)")
        start = time.perf_counter()
        try:
            value = fn()
            if value is not None:
                self.result["sections"][name] = value
        except Exception as error:  # a benchmark never fails the run: record and go on
            self.result["errors"][name] = {
                "error": f"{type(error).__name__}: {error}"[:2000],
                "traceback": traceback.format_exc()[-4000:],
            }
            self.log(f"[suite] {name} failed: {type(error).__name__}: {error}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
        self._save()

    def _estimate(self, images: int, runs: int = 1, tiles: int = 1, steps: int | None = None) -> float:
        per_step = self._per_image_step_s or 0.05
        return runs * (self.steps if steps is None else steps) * per_step * max(1, images) * tiles * 1.2 + 5

    # -------------------------------------------------------------- sections
    def build(self) -> dict:
        from megasr_core.pipelines import MegaSRPipeline

        seconds, self.pipeline = self.clock.time(
            lambda: MegaSRPipeline.from_preset(self.preset, device=self.device, torch_dtype=self.dtype)
        )
        seconds_plain, self.baseline = self.clock.time(
            lambda: PlainSD2ControlNet(self.preset, self.pipeline, self.device, self.dtype)
        )
        counts = self.pipeline.denoiser.parameter_counts()
        return {
            "megasr_build_s": round(seconds, 2),
            "baseline_build_s": round(seconds_plain, 2),
            "denoiser_parameters": counts["total"],
            "extractor_parameters": self.pipeline.extractors.parameter_counts() if self.pipeline.extractors else {},
            "weights_memory_gib": self.clock.peak_gib(),
        }

    def _control(self, batch: int) -> torch.Tensor:
        """Conditions at the size MegaSR works at (its bucket; SeeSR's rule enlarges small outputs)."""
        lr = self.size // self.scale
        height, width = self.pipeline.geometry((lr, lr), self.scale)[2]
        generator = torch.Generator().manual_seed(batch)
        return torch.rand(batch, 3, height, width, generator=generator).to(self.device, self.dtype)

    def run_baseline(self) -> dict:
        assert self.baseline is not None
        rows = {}
        for batch in self.batches:
            control = self._control(batch)
            self.baseline(control, 2, self.guidance_scale)  # warm-up (cuDNN/cuBLAS choices)
            self.clock.reset_peak()
            steps: list[float] = []
            seconds, _ = self.clock.time(lambda: self.baseline(control, self.steps, self.guidance_scale, steps))
            rows[str(batch)] = {
                "total_s": round(seconds, 4),
                "step_median_ms": round(1000 * statistics.median(steps), 2),
                "images_per_s": round(batch / seconds, 3),
                "peak_memory_gib": self.clock.peak_gib(),
            }
            if batch == self.batches[0]:
                self._per_image_step_s = statistics.median(steps) * 1.3 / batch
        return rows

    def _megasr(self, batch: int, repeats: int, label: str) -> dict:
        return self.time_pipeline(self.pipeline, batch, repeats, label)

    def batch_inputs(self, batch: int, guidance_scale: float | None = None) -> tuple[list[Image.Image], dict]:
        """``batch`` of the suite's LR photos and the pipeline arguments every timed run shares (the
        suite's scale and guidance, one seed per image)."""
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        images = _photos(batch, self.size // self.scale)
        return images, {"scale": self.scale, "guidance_scale": guidance_scale, "seed": list(range(batch))}

    def time_pipeline(
        self,
        pipeline: MegaSRPipeline,
        batch: int,
        repeats: int,
        label: str,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        baseline: bool = True,
    ) -> dict:
        """Warm-up, ``repeats`` timed runs (median), then one synchronized run for the stages.

        ``steps``/``guidance_scale`` default to the suite's; ``baseline`` adds the ratio to the plain
        SD2 + ControlNet row of the same batch (meaningful only at the same steps and CFG). On a CPU
        nothing runs asynchronously, so stage timing costs nothing and the last timed run gives the
        stages (no extra run).
        """
        steps = self.steps if steps is None else steps
        images, kwargs = self.batch_inputs(batch, guidance_scale)
        warm_s, _ = self.clock.time(lambda: pipeline(images, num_inference_steps=2, **kwargs))
        self.clock.reset_peak()
        staged_in_run = self.device.type != "cuda"
        runs = [
            self.clock.time(lambda: pipeline(images, num_inference_steps=steps, profile=staged_in_run, **kwargs))
            for _ in range(repeats)
        ]
        totals = [seconds for seconds, _ in runs]
        peak = self.clock.peak_gib()
        staged = runs[-1][1] if staged_in_run else pipeline(images, num_inference_steps=steps, profile=True, **kwargs)
        total = statistics.median(totals)
        row = {
            "total_s": round(total, 4),
            "total_runs_s": [round(t, 4) for t in totals],
            "seconds_per_image": round(total / batch, 4),
            "images_per_s": round(batch / total, 3),
            "step_median_ms": round(1000 * staged.timings["denoise_step_median"], 2),
            "stages_s": {k: v for k, v in staged.timings.items() if k not in ("total", "denoise_step_median")},
            "warmup_s": round(warm_s, 2),
            "peak_memory_gib": peak,
        }
        base = (self.result["sections"].get("baseline") or {}).get(str(batch)) if baseline else None
        if base:
            row["ratio_to_baseline"] = round(total / base["total_s"], 3)
            row["overhead_vs_baseline_pct"] = round(100 * (total / base["total_s"] - 1), 1)
        self.log(f"[suite] {label} batch {batch}: {total:.3f} s, {batch / total:.2f} img/s")
        return row

    def run_megasr(self, label: str, batches: Sequence[int] | None = None) -> dict:
        rows: dict[str, Any] = {}
        for batch in batches or self.batches:
            repeats = self.single_repeats if batch == 1 else 1
            if self.remaining() < self._estimate(batch, repeats + 1):
                rows[str(batch)] = {"skipped": "budget"}
                continue
            rows[str(batch)] = self._megasr(batch, repeats, label)
        return rows

    def run_compiled(self, spec: str) -> dict:
        """One compile scope (``full``/``blocks``, ``:MODE`` for a ``torch.compile`` mode such as
        ``max-autotune-no-cudagraphs``, ``+graphs`` for CUDA graphs over it); each batch's row is
        saved as soon as it is measured (compiling takes minutes)."""
        from megasr_core.pipelines.acceleration import compile_pipeline, uncompile_pipeline, use_cuda_graphs

        scoped, _, extra = spec.partition("+")
        scope, _, mode = scoped.partition(":")
        if extra not in ("", "graphs"):
            raise ValueError(f"compile scope {spec!r}: only '+graphs' may follow the scope")
        torch._dynamo.reset()
        wrapped = compile_pipeline(self.pipeline, scope=scope, mode=mode or None)
        if extra:
            use_cuda_graphs(self.pipeline)
        rows: dict[str, Any] = {"compiled_modules": wrapped}
        self.result["sections"][f"megasr_compiled_{spec}"] = rows
        order = sorted(self.batches, key=lambda b: (b != 1, -b))  # 1 first, then largest first
        try:
            for batch in order:
                repeats = self.single_repeats if batch == 1 else 1
                if self.remaining() < self._estimate(batch, repeats + 1) + 30:
                    rows[str(batch)] = {"skipped": "budget"}
                    continue
                rows[str(batch)] = self._megasr(batch, repeats, f"compiled[{spec}]")
                # The warm-up includes compilation of this shape (first call of new shapes).
                rows[str(batch)]["compile_and_warmup_s"] = rows[str(batch)].pop("warmup_s")
                if self.pipeline.denoiser_graphs is not None:
                    rows["capture_failure"] = self.pipeline.denoiser_graphs.failure
                self._save()
        finally:
            use_cuda_graphs(self.pipeline, enabled=False)
            uncompile_pipeline(self.pipeline)
            torch._dynamo.reset()
        return rows

    def run_cuda_graphs(self, batches: Sequence[int] | None = None, label: str = "cuda_graphs") -> dict:
        """MegaSR with CUDA graphs (captured in the warm-up run: its first step is eager)."""
        from megasr_core.pipelines.acceleration import use_cuda_graphs

        use_cuda_graphs(self.pipeline)
        graphs = self.pipeline.denoiser_graphs
        try:
            rows = self.run_megasr(label, batches)
            rows["graph_shapes"], rows["static_calls"] = len(graphs.graphs), graphs.static_calls
            rows["eager_calls"], rows["capture_failure"] = graphs.eager_calls, graphs.failure
        finally:
            use_cuda_graphs(self.pipeline, enabled=False)
        return rows

    def run_fused_qkv(self) -> dict:
        """Fused self-attention QKV against separate projections, with CUDA graphs, at the largest batch."""
        from megasr_core.pipelines.acceleration import use_cuda_graphs, use_fused_qkv

        batch = self.batches[-1]
        use_cuda_graphs(self.pipeline)
        try:
            separate = self._megasr(batch, 1, "separate_qkv")
            fused_layers = use_fused_qkv(self.pipeline)
            fused = self._megasr(batch, 1, "fused_qkv")
        finally:
            use_fused_qkv(self.pipeline, enabled=False)
            use_cuda_graphs(self.pipeline, enabled=False)
        return {
            "batch": batch,
            "fused_layers": fused_layers,
            "separate": separate,
            "fused": fused,
            "speedup": round(separate["total_s"] / fused["total_s"], 3),
        }

    def run_cudnn_benchmark(self) -> dict:
        """cuDNN's autotuner on: eager at the largest batch, graphs at 1 and the largest."""
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            top = self.batches[-1]
            rows = {"eager": {str(top): self._megasr(top, 1, "cudnn_benchmark eager")}}
            rows["cuda_graphs"] = self.run_cuda_graphs(sorted({1, top}), "cudnn_benchmark graphs")
            return rows
        finally:
            torch.backends.cudnn.benchmark = previous

    def run_breakdown(self) -> dict:
        """One CFG denoiser step (prepared conditioning, as the sampler runs it) with each extra on.

        Attributes MegaSR's per-step cost: plain ControlNet + UNet (the installed modules idle),
        CSM only, MSFM only, both; at batch 1 (launch-bound) and the largest batch. The median of
        15 steps after 3 warm-ups on a GPU (tens of ms each); of 2 on a CPU, where the tiny
        preset's steps take seconds and only the bookkeeping is under test.
        """
        pipe, rows = self.pipeline, {}
        warmups, repeats = (3, 15) if self.device.type == "cuda" else (0, 2)
        lr = self.size // self.scale
        height, width = (v // pipe.vae_scale_factor for v in pipe.geometry((lr, lr), self.scale)[2])
        config = pipe.denoiser.config
        for batch in sorted({1, self.batches[-1]}):
            generator = torch.Generator().manual_seed(batch)

            def rand(*shape: int) -> torch.Tensor:
                return torch.rand(*shape, generator=generator).to(self.device, self.dtype)

            model_batch = 2 * batch
            latents = rand(model_batch, 4, height, width)
            text = rand(model_batch, 77, pipe.denoiser.unet.config.cross_attention_dim)
            control = rand(model_batch, 3, height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)
            tokens = rand(batch, config.num_image_tokens, config.image_embed_dim)
            maps = {
                "hed": rand(batch, 1, *control.shape[-2:]),
                "depth": rand(batch, 1, *control.shape[-2:]),
                "seg": rand(batch, 3, *control.shape[-2:]),
            }
            cases = {"plain": (None, None), "csm": (tokens, None), "msfm": (None, maps), "csm_msfm": (tokens, maps)}
            row = {}
            for name, (image_embeds, guidance) in cases.items():
                conditioning = pipe.denoiser.prepare_conditioning(image_embeds, guidance, model_batch, repeat=2)
                timestep = torch.tensor(501, device=self.device)

                def step() -> None:
                    with torch.inference_mode():
                        pipe.denoiser(latents, timestep, text, control_image=control, conditioning=conditioning)

                for _ in range(warmups):
                    step()
                samples = [self.clock.time(step)[0] for _ in range(repeats)]
                row[f"{name}_ms"] = round(1000 * statistics.median(samples), 2)
            row["csm_extra_ms"] = round(row["csm_ms"] - row["plain_ms"], 2)
            row["msfm_extra_ms"] = round(row["msfm_ms"] - row["plain_ms"], 2)
            row["steps_timed"] = repeats
            rows[str(batch)] = row
        return rows

    def run_large(self) -> dict:
        """One ``large``² output, tiles batched 4 at a time (the pipeline's default), all in one model
        batch (up to 16: a CUDA worker's first choice), then one at a time."""
        assert self.large is not None
        image = _photos(1, self.large // self.scale)
        rows = {}
        for tile_batch in (4, 16, 1):
            if rows and self.remaining() < 1.5 * rows["tile_batch_4"]["total_s"]:
                rows[f"tile_batch_{tile_batch}"] = {"skipped": "budget"}
                continue
            kwargs = {"scale": self.scale, "seed": 0, "tile_batch_size": tile_batch}
            self.pipeline(image, num_inference_steps=1, **kwargs)  # warm-up of the tiled shapes
            self.clock.reset_peak()
            out = self.pipeline(
                image, num_inference_steps=self.steps, guidance_scale=self.guidance_scale, profile=True, **kwargs
            )
            rows[f"tile_batch_{tile_batch}"] = {
                "output_size": list(out.images[0].size),
                "total_s": out.timings["total"],
                "step_median_ms": round(1000 * out.timings["denoise_step_median"], 2),
                "stages_s": {k: v for k, v in out.timings.items() if k not in ("total", "denoise_step_median")},
                "peak_memory_gib": self.clock.peak_gib(),
            }
        return rows

    def run_channels_last(self) -> dict:
        from megasr_core.pipelines.acceleration import use_channels_last

        use_channels_last(self.pipeline)
        try:
            batch = self.batches[-1]
            return {str(batch): self._megasr(batch, 1, "channels_last")}
        finally:
            for net in (self.pipeline.denoiser.unet, self.pipeline.denoiser.controlnet, self.pipeline.vae):
                net.to(memory_format=torch.contiguous_format)

    def run_families(self) -> None:
        """SeeSR's and SeeSR-Turbo's sections (``family_sections``), one family's pipeline at a time."""
        for family, names in FAMILY_SECTIONS.items():
            bench = FamilyBench(self, family)
            try:
                for name, fn in zip(names, (bench.eager, bench.cuda_graphs)):
                    self.section(name, fn, bench.estimate_s())
            finally:
                bench.release()

    def summary(self) -> dict:
        s = self.result["sections"]
        eager, base = s.get("megasr_eager", {}), s.get("baseline", {})
        out: dict[str, Any] = {}
        best_single, best_throughput = None, None
        tuned = s.get("cudnn_benchmark", {})
        variants = [
            ("eager", eager),
            ("cuda_graphs", s.get("megasr_cuda_graphs", {})),
            ("cudnn_benchmark_eager", tuned.get("eager", {})),
            ("cudnn_benchmark_cuda_graphs", tuned.get("cuda_graphs", {})),
        ]
        for name, rows in variants + [(f"compiled_{k}", s.get(f"megasr_compiled_{k}", {})) for k in self.scopes]:
            one = rows.get("1", {})
            if "total_s" in one:
                out[f"{name}_single_image_p50_s"] = one["total_s"]
                best_single = min(best_single or one["total_s"], one["total_s"])
            top = rows.get(str(self.batches[-1]), {})
            if "images_per_s" in top:
                out[f"{name}_images_per_s_batch{self.batches[-1]}"] = top["images_per_s"]
                best_throughput = max(best_throughput or 0, top["images_per_s"])
        for batch in self.batches:
            if "total_s" in eager.get(str(batch), {}) and str(batch) in base:
                out[f"megasr_over_baseline_batch{batch}"] = eager[str(batch)]["ratio_to_baseline"]
        for name, row in s.get("megasr_large", {}).items():
            if "total_s" in row:
                out[f"large_{name}_total_s"], out[f"large_{name}_peak_memory_gib"] = (
                    row["total_s"],
                    row["peak_memory_gib"],
                )
        out["best_single_image_s"], out["best_images_per_s"] = best_single, best_throughput  # MegaSR's
        for label, row in s.get("fast_presets", {}).items():
            if isinstance(row, dict) and "images_per_s" in row:
                out[f"preset_{label}_images_per_s_batch{s['fast_presets']['batch']}"] = row["images_per_s"]
                if "psnr_db" in row:
                    out[f"preset_{label}_psnr_db"] = row["psnr_db"]
        for batch, row in s.get("step_loop_ab", {}).items():
            if isinstance(row, dict) and "speedup" in row:
                out[f"device_step_speedup_batch{batch}"] = row["speedup"]
        overhead = s.get("worker_overhead", {})
        if "service_share_of_pipeline" in overhead:
            out["service_share_of_pipeline"] = overhead["service_share_of_pipeline"]
        if "speedup" in s.get("fused_qkv", {}):
            out["fused_qkv_speedup"] = s["fused_qkv"]["speedup"]
        equality = s.get("ddpm_step_equality", {})
        if "bit_identical" in equality:
            out["ddpm_device_step_bit_identical"] = equality["bit_identical"]
        out.update(family_summary(s, self.batches[-1]))
        return out

    def run(self) -> dict:
        self.section("build", self.build)
        if self.pipeline is None:
            return self.result
        self.section("step_loop_ab", lambda: run_step_loop_ab(self), self._estimate(self.batches[-1], 4))
        self.section(
            "ddpm_step_equality",
            lambda: step_equality(self.device, self.dtype, self.pipeline.scheduler, self.steps, self.batches[-1]),
            10,
        )
        self.section("baseline", self.run_baseline)
        self.section("megasr_eager", lambda: self.run_megasr("eager"), self._estimate(1, 3))
        self.section("megasr_cuda_graphs", self.run_cuda_graphs, self._estimate(1, 3) + 10)
        self.section("fast_presets", lambda: run_fast_presets(self), self._estimate(self.batches[-1], 4))
        self.section("fused_qkv", self.run_fused_qkv, self._estimate(self.batches[-1], 4))
        self.section("worker_overhead", lambda: run_worker_overhead(self), self._estimate(self.batches[-1], 2))
        if self.device.type == "cuda":
            self.section("cudnn_benchmark", self.run_cudnn_benchmark, self._estimate(self.batches[-1], 2) + 10)
        self.section("denoiser_breakdown", self.run_breakdown, 20)
        self.run_families()
        if self.large:
            self.section("megasr_large", self.run_large, self._estimate(1, 1, max(1, (self.large // self.size) ** 2)))
        for scope in self.scopes:
            self.section(
                f"megasr_compiled_{scope}", lambda scope=scope: self.run_compiled(scope), self._estimate(1, 3) + 60
            )
        if self.device.type == "cuda":
            self.section("megasr_channels_last", self.run_channels_last, self._estimate(self.batches[-1], 2))
        self.result["summary"] = self.summary()
        self._save()
        return self.result


def run_gpu_suite(**kwargs: Any) -> dict:
    return GPUSuite(**kwargs).run()
