"""``MegaSRPipeline``: a real photo in, its super-resolved version out (paper Sec. 4.1).

One sampler for every model family (``megasr_core.families``): the weights folder's family
picks the denoiser (MegaSR's, or SeeSR's for ``seesr`` / ``seesr-turbo``), the extractors it
needs, its prompt string and its defaults (steps, guidance, tiling); everything else below is
shared.

LR → EXIF orientation, modes, alpha split → SeeSR's small-input rule and bicubic ×scale →
padding to the model's multiple → guidance extractors on the LR → prompt from tags → LRE start
(the noised VAE latent of the upscaled LR) → DDPM steps with classifier-free guidance (tiled
with Gaussian blending when large) → VAE decode (tiled when large) → colour fix → crop to
exactly ``W·s × H·s`` → alpha back on.

Images whose padded working size falls in the same size bucket (a multiple of 64 px for SD2)
run as one batch, whatever their own size and scale; each image has its own random generator,
so an image comes out the same whether it runs alone or in a batch. ``callback(step, total)``
fires after every step; ``should_cancel()`` is checked before every step and raises
:class:`PipelineCancelled`; ``is_cancelled(index)`` drops one image from its batch instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..extractors import GuidanceExtractors
from ..families import MEGASR, SEESR_TURBO, ModelFamily, get_family
from ..geometry import DEFAULT_MAX_OUTPUT_PIXELS, canvas, check_work_bounds
from ..identity import ModelIdentity, weights_label
from ..models import MegaSRDenoiser, SeeSRDenoiser, get_preset
from ..weights.loading import Denoiser, load_denoiser
from .color_fix import METHODS as COLOR_FIX_METHODS
from .color_fix import color_fix
from .denoiser_graphs import DenoiserGraphs
from .sampling import classifier_free_guidance, guidance_batch, lre_start
from .image_processing import ImageInput, InvalidImageError, PreparedImage, load_image, resize_alpha, to_pil
from .tiling import Tile, blend_tiles, tiles

DEFAULT_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
MIN_SCALE, MAX_SCALE = 1.0, 8.0
MAX_STEPS = 1000


class PipelineCancelled(RuntimeError):
    """``should_cancel()`` returned True; the run stopped before finishing."""


@dataclass
class MegaSRPipelineOutput(BaseOutput):
    images: list[Image.Image | None]  # ``None`` for an image cancelled through ``is_cancelled``
    prompts: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    cancelled: list[int] = field(default_factory=list)  # input indices dropped by ``is_cancelled``


@dataclass(frozen=True)
class _Item:
    """One image of a batch and its output geometry."""

    index: int  # position in the caller's list
    lr: torch.Tensor  # 3×h×w in [0, 1]
    target: tuple[int, int]  # output (height, width) = round(h·s), round(w·s)
    work: tuple[int, int]  # size the model works at (≥ target by SeeSR's small-input rule)


@dataclass(frozen=True)
class _Batch:
    """Images that share a size bucket run together: each is padded to ``padded``, then cropped back."""

    items: list[_Item]
    padded: tuple[int, int]  # the bucket: every item's work size padded to the model's multiple


class _StageTimer:
    """Wall-clock seconds per stage; with ``sync`` the GPU is synchronized at each boundary."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.sync = sync and device.type == "cuda"
        self.device = device
        self.stages: dict[str, float] = {}
        self.steps: list[float] = []

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start = self.now()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + self.now() - start


class MegaSRPipeline(DiffusionPipeline):
    """Diffusion super-resolution: MegaSR (SD2-base + ControlNet with CSM and MSFM, guided by five
    extractors) or, by its weights' family, SeeSR / SeeSR-Turbo (RAM image cross-attentions)."""

    _optional_components = ["extractors"]
    model_cpu_offload_seq = "text_encoder->denoiser->vae"

    def __init__(
        self,
        denoiser: Denoiser,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMScheduler,
        extractors: GuidanceExtractors | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            denoiser=denoiser, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=scheduler, extractors=extractors,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        #: CUDA graphs of the denoiser step (``acceleration.use_cuda_graphs``); ``None`` = eager
        self.denoiser_graphs: DenoiserGraphs | None = None
        down_blocks = len(denoiser.unet.config.down_block_types)
        #: pixel multiple the UNet needs: VAE factor × the UNet's downsampling
        self.size_multiple = self.vae_scale_factor * 2 ** (down_blocks - 1)
        #: ceiling on output and working-canvas pixels per image (a GPU-memory guard; the API checks
        #: its own, smaller bound with the same rule before queueing)
        self.max_output_pixels = DEFAULT_MAX_OUTPUT_PIXELS
        #: which model this is and whether it is trained (set by the constructors below)
        self.identity: ModelIdentity | None = None
        self._check_components()

    @property
    def family(self) -> ModelFamily:
        """The model family: its prompt rule and sampling defaults."""
        return get_family(self.denoiser.family)

    def _check_components(self) -> None:
        unet = self.denoiser.unet.config
        problems = []
        if self.vae.config.latent_channels != unet.in_channels:
            problems.append(f"VAE has {self.vae.config.latent_channels} latent channels, UNet takes {unet.in_channels}")
        if self.text_encoder.config.hidden_size != unet.cross_attention_dim:
            problems.append(f"text encoder width {self.text_encoder.config.hidden_size} ≠ UNet cross-attention {unet.cross_attention_dim}")
        source = self.denoiser.image_token_source
        clip = self.extractors.clip if self.extractors is not None else None
        if clip is not None and source == "clip":
            width = clip.token_dim
            if width != self.denoiser.config.image_embed_dim:
                problems.append(f"CLIP tokens are {width} wide, the CSM expects {self.denoiser.config.image_embed_dim}")
        if source == "ram" and self.extractors is not None:
            tagger = self.extractors.tagger
            if self.extractors.tagger_name != "ram":
                problems.append(f"{self.family.title} attends to RAM's image embeddings, but the tagger is "
                                f"{self.extractors.tagger_name or 'missing'}: put RAM (+ DAPE) in extractors/tagger/ "
                                "(megasr weights install-ram)")
            elif tagger.config.embed_width != self.denoiser.config.image_embed_dim:
                problems.append(f"RAM's embeddings are {tagger.config.embed_width} wide, the image attentions take "
                                f"{self.denoiser.config.image_embed_dim}")
        if problems:
            raise ValueError("incompatible pipeline components: " + "; ".join(problems))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        load_extractors: bool = True,
        revision: str | None = None,
    ) -> "MegaSRPipeline":
        """Load a weights folder of any family (see ``megasr_core.weights``) onto ``device``.

        ``directory`` is a local weights folder or a Hub id (``org/name``, ``hf://org/name[@rev]``;
        ``revision``: a branch, tag or commit hash), fetched through the Hub cache
        (``megasr_core.weights.hub``). Default dtype: float16 on CUDA, float32 elsewhere. Only the
        extractors the model uses are loaded; SeeSR's RAM runs in float32, as SeeSR runs it.
        """
        from ..weights.hub import resolve_weights_source
        from ..weights.summary import untrained_reasons

        directory = resolve_weights_source(directory, revision=revision)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        denoiser = load_denoiser(directory, device=device, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=dtype).to(device)
        text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder", torch_dtype=dtype).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        extractors = None
        if load_extractors and (directory / "extractors").is_dir():
            wanted = denoiser.extractors_needed
            present = [n for n in wanted if n == "tagger" or (directory / "extractors" / n).is_dir()]
            extractor_dtype = torch.float32 if denoiser.image_token_source == "ram" else dtype
            extractors = GuidanceExtractors.from_pretrained(directory / "extractors", enabled=present, device=device,
                                                            torch_dtype=extractor_dtype)
        for module in (vae, text_encoder):
            module.eval().requires_grad_(False)
        denoiser.eval().requires_grad_(False)
        pipeline = cls(denoiser, vae, text_encoder, tokenizer, scheduler, extractors)
        pipeline.identity = ModelIdentity(denoiser.family, weights_label(directory), str(dtype).removeprefix("torch."),
                                          tuple(untrained_reasons(directory, denoiser)),
                                          extractors.tagger_name if extractors is not None else None)
        return pipeline

    @classmethod
    def from_preset(
        cls,
        name: str,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        with_extractors: bool = True,
        seed: int = 0,
        family: str = MEGASR,
    ) -> "MegaSRPipeline":
        """Random-initialized pipeline of a preset's shapes and a family (benchmarks; nothing downloaded).

        Token ids come from a small byte-level tokenizer, valid for any text-encoder vocabulary.
        SeeSR families get a random RAM of the preset's size as their only extractor; SeeSR-Turbo
        gets sd-turbo's scheduler settings (trailing timesteps).
        """
        import tempfile

        from ..extractors import RAMConfig, RAMTagger, real_preset, tiny_preset
        from ..weights.layout import TURBO_SCHEDULER
        from ..weights.tiny import write_tiny_tokenizer

        preset = get_preset(name)
        get_family(family)
        torch.manual_seed(seed)
        device = torch.device(device)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tiny_tokenizer(Path(tmp))
        with torch.device(device):
            if family == MEGASR:
                denoiser: Denoiser = MegaSRDenoiser.from_preset(name)
            else:
                denoiser = SeeSRDenoiser.from_preset(name, family=family)
            vae = AutoencoderKL(**preset.vae)
            text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
            extractors = None
            if with_extractors and family == MEGASR:
                extractor_preset = tiny_preset() if name == "tiny" else real_preset()
                extractors = GuidanceExtractors.from_preset(extractor_preset, tokenizer=tokenizer)
            elif with_extractors:
                extractors = GuidanceExtractors(tagger=RAMTagger(RAMConfig.tiny() if name == "tiny" else RAMConfig()))
        scheduler = DDPMScheduler(**{**preset.scheduler, **(TURBO_SCHEDULER if family == SEESR_TURBO else {})})
        pipeline = cls(denoiser, vae, text_encoder, tokenizer, scheduler, extractors)
        pipeline.to(device, torch_dtype)
        if extractors is not None and denoiser.image_token_source == "ram":
            extractors.to(dtype=torch.float32)
        for module in (denoiser, vae, text_encoder, extractors):
            if module is not None:
                module.eval().requires_grad_(False)
        pipeline.identity = ModelIdentity(family, f"random {name} preset", str(torch_dtype).removeprefix("torch."),
                                          (f"random weights of the {name} preset",),
                                          extractors.tagger_name if extractors is not None else None)
        return pipeline

    def save_pretrained(self, directory: str | Path, **_: Any) -> None:  # type: ignore[override]
        """Write the MegaSR weights layout (``megasr_core.weights``)."""
        from ..weights.layout import EXTRACTORS_DIR, write_model_index

        directory = Path(directory)
        self.denoiser.save_pretrained(directory)
        self.vae.save_pretrained(directory / "vae")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.scheduler.save_pretrained(directory / "scheduler")
        if self.extractors is not None:
            self.extractors.save_pretrained(directory / EXTRACTORS_DIR)
        write_model_index(directory)

    # ------------------------------------------------------------------ __call__
    @torch.inference_mode()
    def __call__(
        self,
        images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage],
        scale: float | Sequence[float] = 4,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        prompt: str | Sequence[str] = "",
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        color_fix: str = "adain",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        vae_tile_size: int | None = None,
        controlnet_scale: float = 1.0,
        start_timestep: int | None = 999,
        max_cached_tiles: int = 16,
        tile_batch_size: int = 4,
        callback: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        is_cancelled: Callable[[int], bool] | None = None,
        max_pixels: int | None = None,
        max_output_pixels: int | None = None,
        max_batch_size: int | None = None,
        profile: bool = False,
    ) -> MegaSRPipelineOutput:
        """Super-resolve ``images`` (paths, bytes, files, PIL images or ``load_image`` results) by ``scale``.

        ``None`` for ``num_inference_steps``, ``guidance_scale``, ``tile_overlap`` and
        ``vae_tile_size`` means the family's default (``self.family.defaults``: MegaSR and SeeSR 50
        steps at CFG 5.5, SeeSR-Turbo 2 steps at CFG 1, i.e. without classifier-free guidance).

        Args:
            scale, prompt: one value for every image, or a list with one per image.
            seed: an int (every image gets its own generator seeded with it, so an image's output
                does not depend on its batch mates) or a list with one seed per image.
            generator: one generator shared by all images (drawn in image order), or one per image.
            tile_size: latent tile side (pixels / 8); ``None`` = the family's tiles when its rule
                asks for them (MegaSR: 96-latent tiles above a 128-latent side, i.e. 1024 px;
                SeeSR: 96-latent tiles above 96² latent pixels), ``0`` = never tile.
            tile_overlap: latent overlap between tiles (MegaSR 8, SeeSR 4, SeeSR-Turbo 32).
            vae_tile_size: the VAE encodes/decodes in tiles of this many pixels when larger
                (default: MegaSR 1024; SeeSR encodes in 1024-px and decodes in 1792-px tiles).
            start_timestep: the LRE start noises the upscaled LR's VAE latent to this timestep
                (SeeSR's ``start_steps``: 999, nearly pure noise), then the normal schedule runs
                from its first timestep; it may not be below that first timestep. ``None`` =
                noise to the schedule's first timestep (981 for 50 steps).
            max_cached_tiles: keep each tile's guidance modulation across steps up to this many
                tiles (memory grows with the image beyond it, so it is recomputed instead).
            tile_batch_size: latent tiles run together in one model batch (faster on a GPU;
                activation memory grows with it; 1 = one tile at a time).
            is_cancelled: ``is_cancelled(index)`` is asked before every step for every image
                still running; a ``True`` drops that image from its batch (its output is ``None``
                and its index is listed in ``cancelled``) while the others go on.
            max_pixels: refuse inputs above this many pixels (decompression-bomb guard).
            max_output_pixels: refuse images whose output or working canvas (short side enlarged
                to 512) would exceed this many pixels (``WorkBoundsError``, a ``ValueError``);
                ``None`` = ``self.max_output_pixels``.
            max_batch_size: at most this many images per model batch (default: all that share a
                size bucket).
            profile: synchronize the GPU between stages so ``timings`` are exact.
        """
        # 1. Check the parameters (before touching any image); the family fills in what is not given.
        defaults = self.family.defaults
        num_inference_steps = defaults.steps if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        tile_overlap = defaults.tile_overlap if tile_overlap is None else tile_overlap
        vae_tiles = (defaults.vae_encode_tile, defaults.vae_decode_tile) if vae_tile_size is None else (vae_tile_size,) * 2
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        if not sources:
            raise InvalidImageError("no images given")
        count = len(sources)
        scales = _per_image("scale", scale, count)
        prompts_in = _per_image("prompt", prompt, count)
        self._check_parameters(scales, num_inference_steps, guidance_scale, color_fix, tile_size, tile_overlap, vae_tiles[0])
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self._check_start_timestep(start_timestep, num_inference_steps)
        if isinstance(tile_batch_size, bool) or not isinstance(tile_batch_size, int) or tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be a positive integer, got {tile_batch_size!r}")
        generators = _generators(generator, seed, count)
        timer = _StageTimer(self.device, sync=profile)
        start = time.perf_counter()
        # 2. Decode the inputs: orientation, modes, alpha.
        with timer.stage("decode_inputs"):
            limit = max_pixels if max_pixels is not None else 64_000_000
            prepared = [source if isinstance(source, PreparedImage) else load_image(source, max_pixels=limit)
                        for source in sources]
        results: list[Image.Image | None] = [None] * count
        prompts: list[str] = [""] * count
        cancelled: list[int] = []
        bound = max_output_pixels if max_output_pixels is not None else self.max_output_pixels
        for image, image_scale in zip(prepared, scales):
            check_work_bounds(image.size, image_scale, self.size_multiple, bound)
        batches = self._group(prepared, scales, max_batch_size)
        total_steps = num_inference_steps * len(batches)
        done_steps = 0
        try:
            for batch in batches:
                def step_done(step: int, _total: int, offset: int = done_steps) -> None:
                    if callback is not None:
                        callback(offset + step, total_steps)

                outputs, batch_prompts, dropped = self._upscale_batch(
                    batch, prepared, num_inference_steps, guidance_scale, prompts_in, negative_prompt, generators,
                    color_fix, tile_size, tile_overlap, vae_tiles, controlnet_scale, start_timestep, max_cached_tiles,
                    tile_batch_size, step_done, should_cancel, is_cancelled, timer,
                )
                done_steps += num_inference_steps
                for index, text in batch_prompts.items():
                    prompts[index] = text
                for index, image in outputs.items():
                    results[index] = image
                cancelled.extend(dropped)
        finally:
            self.denoiser.clear_caches()  # the CSMs' cached image keys/values of this call
        timings = {k: round(v, 4) for k, v in timer.stages.items()}
        if timer.steps:
            timings["denoise_step_median"] = round(float(np.median(timer.steps)), 4)
        timings["total"] = round(time.perf_counter() - start, 4)
        return MegaSRPipelineOutput(images=results, prompts=prompts, timings=timings, cancelled=sorted(cancelled))

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _check_parameters(scales, steps, guidance_scale, color_fix_method, tile_size, tile_overlap, vae_tile_size) -> None:
        for scale in scales:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not MIN_SCALE <= scale <= MAX_SCALE:
                raise ValueError(f"scale must be a number from {MIN_SCALE:g} to {MAX_SCALE:g}, got {scale!r}")
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= 50:
            raise ValueError(f"guidance_scale must be from 0 to 50, got {guidance_scale!r}")
        if color_fix_method not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {color_fix_method!r}")
        if tile_size is not None and (not isinstance(tile_size, int) or (tile_size != 0 and tile_size < 16)):
            raise ValueError(f"tile_size must be 0 (off), None (auto) or at least 16 latent pixels, got {tile_size!r}")
        if not isinstance(tile_overlap, int) or tile_overlap < 0 or (tile_size and tile_overlap >= tile_size):
            raise ValueError(f"tile_overlap must be ≥ 0 and smaller than tile_size, got {tile_overlap!r}")
        if not isinstance(vae_tile_size, int) or vae_tile_size < 64:
            raise ValueError(f"vae_tile_size must be at least 64 pixels, got {vae_tile_size!r}")

    def _check_start_timestep(self, start_timestep: int | None, steps: int) -> None:
        """``start_timestep`` is None or an integer from the schedule's first timestep to the last training timestep.

        Noising below the first timestep would leave the first steps denoising noise that is not there.
        """
        if start_timestep is None:
            return
        last = self.scheduler.config.num_train_timesteps - 1
        if isinstance(start_timestep, bool) or not isinstance(start_timestep, int) or not 0 <= start_timestep <= last:
            raise ValueError(f"start_timestep must be None or an integer from 0 to {last}, got {start_timestep!r}")
        self.scheduler.set_timesteps(steps)
        first = int(self.scheduler.timesteps[0])
        if start_timestep < first:
            raise ValueError(f"start_timestep {start_timestep} is below the first of the {steps} scheduler timesteps ({first})")

    def geometry(self, size: tuple[int, int], scale: float) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(target, work, bucket) as (height, width) for an LR image of ``size`` = (width, height).

        ``target`` is the output size; ``work`` the size the model runs at (SeeSR: a short side
        that would end below 512 px is enlarged to 512 first); ``bucket`` the work size padded to
        the model's multiple. Images with the same bucket can share a batch.
        """
        sizes = canvas(size, scale, self.size_multiple)  # the rule the API admits jobs by
        return sizes.target, sizes.work, sizes.bucket

    def _group(self, prepared: list[PreparedImage], scales: list[float], max_batch_size: int | None) -> list[_Batch]:
        """Group images by size bucket (first-seen order), at most ``max_batch_size`` per batch."""
        groups: dict[tuple[int, int], list[_Item]] = {}
        for index, (image, scale) in enumerate(zip(prepared, scales)):
            target, work, bucket = self.geometry(image.size, scale)
            groups.setdefault(bucket, []).append(_Item(index=index, lr=image.rgb, target=target, work=work))
        limit = max_batch_size or len(prepared)
        return [
            _Batch(items=items[start : start + limit], padded=bucket)
            for bucket, items in groups.items()
            for start in range(0, len(items), limit)
        ]

    def _upscale_batch(
        self, batch: _Batch, prepared: list[PreparedImage], steps: int, guidance_scale: float, user_prompts: list[str],
        negative_prompt: str, generators: list[torch.Generator], color_fix_method: str, tile_size: int | None,
        tile_overlap: int, vae_tiles: tuple[int, int], controlnet_scale: float, start_timestep: int | None, max_cached_tiles: int,
        tile_batch_size: int,
        step_done: Callable[[int, int], None], should_cancel: Callable[[], bool] | None,
        is_cancelled: Callable[[int], bool] | None, timer: _StageTimer,
    ) -> tuple[dict[int, Image.Image], dict[int, str], list[int]]:
        device, dtype = self.device, self.denoiser.dtype
        items = list(batch.items)
        gens = [generators[item.index] for item in items]
        # 3. Bicubic ×scale per image (the ControlNet condition and the colour reference), padded
        # to the bucket. The padding sits bottom/right, so cropping gives each image back.
        with timer.stage("preprocess"):
            control = torch.cat([
                _pad(F.interpolate(item.lr[None].to(device), size=item.work, mode="bicubic", align_corners=False).clamp(0, 1), batch.padded)
                for item in items
            ])
        # 4. Guidance extractors on the LR (batched over images of one LR size).
        with timer.stage("extractors"):
            guidance, image_tokens, tags = self._run_extractors(items, batch.padded)
        # 5. Prompts: tags + the user's prompt + SeeSR's quality suffix; CFG pairs [negative, positive].
        with timer.stage("text_encoding"):
            prompts = [self.family.prompt(t, user_prompts[item.index]) for t, item in zip(tags, items)]
            do_cfg = guidance_scale > 1.0
            positive = self._encode_text(prompts)
            negative = self._encode_text([negative_prompt] * len(items)) if do_cfg else None
        # 6. LRE start (SeeSR): the VAE latent of the upscaled LR noised to ``start_timestep`` (999;
        # None = the first timestep); the schedule then runs from its own first timestep.
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        with timer.stage("vae_encode"):
            latents = self._encode_image(control.to(dtype), vae_tiles[0], gens)
            noise = _randn(latents.shape, gens).to(device, latents.dtype)
            latents = lre_start(self.scheduler, latents, noise, start_timestep)
        # 7. Denoising loop with classifier-free guidance, tiled when large.
        height, width = latents.shape[-2:]
        # Auto: the family's rule. MegaSR: one pass up to a 128-latent side (1024 px), beyond it
        # 96-latent tiles (a threshold at the tile size itself would run two near-full tiles for a
        # 97-latent image). SeeSR: 96-latent tiles once the latent has more than 96² pixels.
        defaults = self.family.defaults
        tile = tile_size if tile_size is not None else (defaults.tile_size if defaults.needs_tiling(height, width) else 0)
        tile_list = tiles(height, width, tile, tile_overlap) if tile else [Tile(0, height, 0, width)]
        repeat = 2 if do_cfg else 1
        # Conditioning per group of tiles, with the maps once for both CFG halves. Kept across steps (each
        # MSFM computes its modulation once) up to ``max_cached_tiles``; beyond that memory
        # would grow with the image, so the modulation is recomputed at every step instead.
        reuse = len(tile_list) <= max_cached_tiles
        conditionings: dict[tuple[Tile, ...], Any] = {}

        def conditioning_for(group: tuple[Tile, ...], batch_size: int):
            if group in conditionings:
                return conditionings[group]
            pixels = [part.pixels(self.vae_scale_factor) for part in group]
            tokens = torch.cat([image_tokens] * len(group)) if image_tokens is not None else None
            made = self.denoiser.prepare_conditioning(
                tokens, {k: torch.cat([p.crop(v) for p in pixels]) for k, v in guidance.items()}, batch_size,
                reuse_modulation=reuse, repeat=repeat,
            )
            if reuse:
                conditionings[group] = made
            return made

        dropped: list[int] = []
        with timer.stage("denoise"):
            for index, t in enumerate(timesteps):
                if should_cancel is not None and should_cancel():
                    raise PipelineCancelled(f"cancelled before step {index + 1} of {steps}")
                if is_cancelled is not None:
                    keep = [row for row, item in enumerate(items) if not is_cancelled(item.index)]
                    if len(keep) < len(items):
                        dropped += [item.index for row, item in enumerate(items) if row not in keep]
                        if not keep:
                            return {}, {item.index: p for item, p in zip(batch.items, prompts)}, dropped
                        rows = torch.tensor(keep, device=device)
                        items, gens, prompts = [items[r] for r in keep], [gens[r] for r in keep], [prompts[r] for r in keep]
                        latents, control, positive = latents[rows], control[rows], positive[rows]
                        negative = negative[rows] if negative is not None else None
                        image_tokens = image_tokens[rows] if image_tokens is not None else None
                        guidance = {key: value[rows] for key, value in guidance.items()}
                        conditionings.clear()
                step_start = timer.now()

                def predict_many(group: list[Tile]) -> list[torch.Tensor]:
                    # One model batch for the tiles of ``group``: [negative halves of every tile;
                    # positive halves of every tile], so each tile's images line up with its maps.
                    count = len(group)
                    latent_in = guidance_batch(torch.cat([part.crop(latents) for part in group]), do_cfg)
                    texts = [positive] * count
                    if do_cfg:
                        texts = [negative] * count + texts
                    controls = torch.cat([part.pixels(self.vae_scale_factor).crop(control) for part in group]).to(dtype)
                    eps = (self.denoiser_graphs or self.denoiser)(
                        latent_in, t, torch.cat(texts), control_image=guidance_batch(controls, do_cfg),
                        conditioning=conditioning_for(tuple(group), latent_in.shape[0]),
                        conditioning_scale=controlnet_scale,
                    )
                    if do_cfg:
                        eps = classifier_free_guidance(eps, guidance_scale)
                    return list(eps.chunk(count))

                noise_pred = blend_tiles(latents, tile_list, predict_many=predict_many, group_size=tile_batch_size)
                latents = self.scheduler.step(noise_pred, t, latents, generator=gens).prev_sample
                timer.steps.append(timer.now() - step_start)
                step_done(index + 1, steps)
        # 8. VAE decode (tiled when large).
        with timer.stage("vae_decode"):
            decoded = self._decode_latents(latents, vae_tiles[1])
        # 9. Per image: crop, colour fix against its upscaled LR, exact output size, alpha.
        with timer.stage("postprocess"):
            outputs: dict[int, Image.Image] = {}
            for row, item in enumerate(items):
                work_h, work_w = item.work
                image = decoded[row : row + 1, :, :work_h, :work_w].float()
                image = color_fix(image, control[row : row + 1, :, :work_h, :work_w].float(), color_fix_method)
                if item.work != item.target:
                    image = F.interpolate(image, size=item.target, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
                alpha = prepared[item.index].alpha
                if alpha is not None:
                    alpha = resize_alpha(alpha, (item.target[1], item.target[0]))
                outputs[item.index] = to_pil(image[0], alpha)
        return outputs, {item.index: p for item, p in zip(items, prompts)}, dropped

    def extract_guidance(self, lr: torch.Tensor, size: tuple[int, int], with_tags: bool = True):
        """Guidance maps resized to ``size``, image tokens and tags of LR images in [0, 1].

        Only the extractors the denoiser consumes run. The image tokens are CLIP's (MegaSR's CSM)
        or RAM's image embeddings (SeeSR), as the denoiser's ``image_token_source`` says; RAM's
        stay in float32, as SeeSR feeds them. Shared by sampling and training.
        """
        config, source = self.denoiser.config, self.denoiser.image_token_source
        if self.extractors is None:
            if source == "ram":
                raise ValueError(f"{self.family.title} needs RAM's image embeddings, but no extractors are loaded")
            return {}, None, [[] for _ in range(lr.shape[0])]
        wanted = [n for n in self.denoiser.extractors_needed if n in self.extractors.available]
        if not with_tags and source != "ram":
            wanted = [n for n in wanted if n != "tagger"]
        out = self.extractors(lr.to(self.extractors.dtype), enabled=wanted, ram_embeds=source == "ram")
        guidance = {
            key: F.interpolate(value.float(), size=size, mode="bilinear", align_corners=False).to(self.denoiser.dtype)
            for key, value in out.maps().items() if key in config.guidance_keys
        }
        if source == "ram":
            tokens = out.ram_embeds
        else:
            tokens = out.image_tokens.to(self.denoiser.dtype) if (out.image_tokens is not None and source == "clip") else None
        tags = out.tags if out.tags is not None else [[] for _ in range(lr.shape[0])]
        return guidance, tokens, tags

    def _run_extractors(self, items: list[_Item], padded: tuple[int, int]):
        """Guidance maps padded to the bucket, CLIP image tokens and tags, in ``items`` order.

        The extractors see each LR at its own size: images that share an LR and working size run
        as one extractor batch, so a batch mate never changes what an image's extractors see.
        """
        groups: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = {}
        for row, item in enumerate(items):
            groups.setdefault((tuple(item.lr.shape), item.work), []).append(row)
        maps: dict[str, list[torch.Tensor | None]] = {}
        tokens: list[torch.Tensor | None] = [None] * len(items)
        tags: list[list[str]] = [[] for _ in items]
        for (_, work), rows in groups.items():
            lr = torch.stack([items[r].lr for r in rows]).to(self.device)
            guidance, group_tokens, group_tags = self.extract_guidance(lr, work)
            for key, value in guidance.items():
                padded_maps = _pad(value, padded)
                slots = maps.setdefault(key, [None] * len(items))
                for position, row in enumerate(rows):
                    slots[row] = padded_maps[position : position + 1]
            for position, row in enumerate(rows):
                tags[row] = group_tags[position]
                if group_tokens is not None:
                    tokens[row] = group_tokens[position : position + 1]
        guidance = {key: torch.cat(values) for key, values in maps.items()}  # type: ignore[arg-type]
        image_tokens = torch.cat(tokens) if all(t is not None for t in tokens) else None  # type: ignore[arg-type]
        return guidance, image_tokens, tags

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.denoiser.dtype)

    def _configure_vae_tiling(self, pixels: tuple[int, int], vae_tile_size: int) -> None:
        need = max(pixels) > vae_tile_size
        self.vae.use_tiling = need
        if need:
            self.vae.tile_sample_min_size = vae_tile_size
            self.vae.tile_latent_min_size = vae_tile_size // self.vae_scale_factor

    def _encode_image(self, image: torch.Tensor, vae_tile_size: int, generators: list[torch.Generator]) -> torch.Tensor:
        """Sampled VAE latents (×scaling), each image's sample drawn from its own generator."""
        self._configure_vae_tiling(image.shape[-2:], vae_tile_size)
        posterior = self.vae.encode(image.to(self.vae.dtype) * 2 - 1).latent_dist
        noise = _randn(posterior.mean.shape, generators).to(posterior.mean.device, posterior.mean.dtype)
        return (posterior.mean + posterior.std * noise) * self.vae.config.scaling_factor

    def _decode_latents(self, latents: torch.Tensor, vae_tile_size: int) -> torch.Tensor:
        pixels = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        self._configure_vae_tiling(pixels, vae_tile_size)
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((image.float() + 1) / 2).clamp(0, 1)


def _per_image(name: str, value: Any, count: int) -> list[Any]:
    """``value`` for each of ``count`` images: a single value is shared, a list must match."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} values for {count} images; give one value or one per image")
        return list(value)
    return [value] * count


def _generators(generator: Any, seed: Any, count: int) -> list[torch.Generator]:
    """One CPU generator per image (several entries may be the same shared generator)."""
    if generator is not None:
        if isinstance(generator, torch.Generator):
            return [generator] * count
        return _per_image("generator", generator, count)
    if seed is None:
        seed = int(torch.seed() % 2**63)
    seeds = _per_image("seed", seed, count)
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ValueError(f"seed must be an integer from 0 to 2^63-1, got {value!r}")
    return [torch.Generator(device="cpu").manual_seed(value) for value in seeds]


def _randn(shape: torch.Size | tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32, CPU), row ``i`` drawn from ``generators[i]``."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])


def _pad(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad bottom/right to ``size``: reflect where the image is large enough, else replicate."""
    pad_h, pad_w = size[0] - image.shape[-2], size[1] - image.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < image.shape[-2] and pad_w < image.shape[-1] else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
