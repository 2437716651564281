"""``MegaSRPipeline``: a real photo in, its super-resolved version out (paper Sec. 4.1).

One sampler for every model family (``megasr_core.families``): the weights folder's family
picks the denoiser (MegaSR's, or SeeSR's for ``seesr`` / ``seesr-turbo``), the extractors it
needs, its prompt string and its defaults (steps, guidance, tiling); everything else below is
shared.

The steps are the numbered comments of ``MegaSRPipeline.__call__``, each one method call or a
few lines: check the inputs (``check_inputs``) → decode the LR (EXIF orientation, modes, alpha
split) → batches by size bucket → SeeSR's small-input rule and bicubic ×scale, padded to the
model's multiple → guidance extractors on the LR → prompt from tags → LRE start (the noised VAE
latent of the upscaled LR) → DDPM steps with classifier-free guidance (tiled with Gaussian
blending when large) → VAE decode (tiled when large) → colour fix, exactly ``W·s × H·s``, alpha
back on.

Images whose padded working size falls in the same size bucket (a multiple of 64 px for SD2)
run as one batch, whatever their own size and scale (``batching``); each image has its own
random generator, so an image comes out the same whether it runs alone or in a batch. ``callback(step, total)``
fires after every step; ``should_cancel()`` is checked before every step and raises
:class:`PipelineCancelled`; ``is_cancelled(index)`` drops one image from its batch instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..extractors import GuidanceExtractors
from ..families import MEGASR, SEESR_TURBO, ModelFamily, get_family
from ..geometry import DEFAULT_MAX_OUTPUT_PIXELS, MIN_WORK_SIDE, canvas, check_work_bounds
from ..identity import ModelIdentity, weights_label
from ..models import MegaSRDenoiser, SeeSRDenoiser, get_preset
from ..parameters import (
    DDPM,
    FULL,
    cfg_interval_problem,
    cfg_on_step,
    color_fix_problem,
    default_steps,
    guidance_scale_problem,
    sampler_problem,
    scale_problem,
    steps_problem,
    tile_size_problem,
)
from ..weights.loading import Denoiser, load_denoiser
from .batching import (
    Batch,
    BatchItem,
    RunningBatch,
    extractor_groups,
    group_by_bucket,
    image_generators,
    pad_to,
    padded_batch_size,
    per_image,
    randn_per_image,
)
from .color_fix import color_fix
from .denoiser_graphs import DenoiserGraphs, StepUpdate
from .image_processing import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    InvalidImageError,
    PreparedImage,
    load_image,
    resize_alpha,
    to_pil,
)
from .precision import use_precision
from .samplers import DeviceDDPM, first_timestep, make_sampler
from .sampling import classifier_free_guidance, guidance_batch, lre_start
from .step_pacing import StepPacer
from .tiling import Tile, blend_tiles, tiles
from .timing import StageTimer

DEFAULT_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"


class PipelineCancelled(RuntimeError):
    """``should_cancel()`` returned True; the run stopped before finishing."""


def native_side(sample_size: int | tuple[int, int] | list[int] | None, vae_scale_factor: int) -> int:
    """The short side, in pixels, a UNet of latent ``sample_size`` was trained at; SD2's 512 when a
    config leaves the size out (diffusers' default is ``None``)."""
    if sample_size is None:
        return MIN_WORK_SIDE
    side = min(sample_size) if isinstance(sample_size, (tuple, list)) else sample_size
    return int(side) * vae_scale_factor


@dataclass
class MegaSRPipelineOutput(BaseOutput):
    images: list[Image.Image | None]  # ``None`` for an image cancelled through ``is_cancelled``
    prompts: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    cancelled: list[int] = field(default_factory=list)  # input indices dropped by ``is_cancelled``


@dataclass(frozen=True)
class CheckedInputs:
    """The arguments of one call after ``check_inputs``: the family's defaults filled in, one value per image."""

    sources: list[Any]  # what ``images`` named, one entry per image
    scales: list[float]
    prompts: list[str]  # the user's prompt per image
    generators: list[torch.Generator]
    steps: int
    guidance_scale: float
    negative_prompt: str
    color_fix: str
    tile_size: int | None  # None = the family's rule
    tile_overlap: int
    vae_tiles: tuple[int, int]  # VAE (encode, decode) tile sides in pixels
    controlnet_scale: float
    start_timestep: int | None
    max_cached_tiles: int
    tile_batch_size: int
    max_pixels: int
    max_output_pixels: int
    max_batch_size: int | None
    sampler: str = DDPM
    cfg_interval: tuple[float, float] | None = None  # None = CFG at every step

    @property
    def do_cfg(self) -> bool:
        """Whether classifier-free guidance runs at all (a model batch of [negative, positive] halves)."""
        return self.guidance_scale > 1.0

    def cfg_at(self, index: int) -> bool:
        """Whether step ``index`` runs classifier-free guidance (its position is in ``cfg_interval``)."""
        return self.do_cfg and cfg_on_step(self.cfg_interval, index, self.steps)


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
            denoiser=denoiser,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            extractors=extractors,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        #: CUDA graphs of the denoiser step (``acceleration.use_cuda_graphs``); ``None`` = eager
        self.denoiser_graphs: DenoiserGraphs | None = None
        down_blocks = len(denoiser.unet.config.down_block_types)
        #: pixel multiple the UNet needs: VAE factor × the UNet's downsampling
        self.size_multiple = self.vae_scale_factor * 2 ** (down_blocks - 1)
        #: short side of the working canvas at least: the UNet's native resolution (512 px for
        #: SD2-base, SeeSR's rule; 128 px for the tiny preset)
        self.min_work_side = native_side(denoiser.unet.config.sample_size, self.vae_scale_factor)
        #: ceiling on output and working-canvas pixels per image (a GPU-memory guard; the API checks
        #: its own, smaller bound with the same rule before queueing)
        self.max_output_pixels = DEFAULT_MAX_OUTPUT_PIXELS
        #: which model this is and whether it is trained (set by the constructors below)
        self.identity: ModelIdentity | None = None
        #: the denoiser's linear layers: ``full`` (as loaded) or ``fp8`` (``precision.use_precision``)
        self.precision = FULL
        #: batch sizes a batch is padded up to (``batching.BATCH_BUCKETS``, set with CUDA graphs or
        #: compile, where every new shape costs a capture or a compilation); ``None`` = as they come
        self.batch_buckets: tuple[int, ...] | None = None
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
            problems.append(
                f"text encoder width {self.text_encoder.config.hidden_size} ≠ "
                f"UNet cross-attention {unet.cross_attention_dim}"
            )
        source = self.denoiser.image_token_source
        clip = self.extractors.clip if self.extractors is not None else None
        if clip is not None and source == "clip":
            width = clip.token_dim
            if width != self.denoiser.config.image_embed_dim:
                problems.append(f"CLIP tokens are {width} wide, the CSM expects {self.denoiser.config.image_embed_dim}")
        if source == "ram" and self.extractors is not None:
            tagger = self.extractors.tagger
            if self.extractors.tagger_name != "ram":
                problems.append(
                    f"{self.family.title} attends to RAM's image embeddings, but the tagger is "
                    f"{self.extractors.tagger_name or 'missing'}: put RAM (+ DAPE) in extractors/tagger/ "
                    "(megasr weights install-ram)"
                )
            elif tagger.config.embed_width != self.denoiser.config.image_embed_dim:
                problems.append(
                    f"RAM's embeddings are {tagger.config.embed_width} wide, the image attentions take "
                    f"{self.denoiser.config.image_embed_dim}"
                )
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
        precision: str = FULL,
    ) -> MegaSRPipeline:
        """Load a weights folder of any family (see ``megasr_core.weights``) onto ``device``.

        ``directory`` is a local weights folder or a Hub id (``org/name``, ``hf://org/name[@rev]``;
        ``revision``: a branch, tag or commit hash), fetched through the Hub cache
        (``megasr_core.weights.hub``). Default dtype: float16 on CUDA, float32 elsewhere. Only the
        extractors the model uses are loaded; SeeSR's RAM runs in float32, as SeeSR runs it.
        ``precision="fp8"`` converts the denoiser's linear layers to float8 (``precision``).
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
            extractors = GuidanceExtractors.from_pretrained(
                directory / "extractors", enabled=present, device=device, torch_dtype=extractor_dtype
            )
        for module in (vae, text_encoder):
            module.eval().requires_grad_(False)
        denoiser.eval().requires_grad_(False)
        pipeline = cls(denoiser, vae, text_encoder, tokenizer, scheduler, extractors)
        use_precision(pipeline, precision)
        pipeline.identity = ModelIdentity(
            denoiser.family,
            weights_label(directory),
            str(dtype).removeprefix("torch."),
            tuple(untrained_reasons(directory, denoiser)),
            extractors.tagger_name if extractors is not None else None,
            precision,
        )
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
        precision: str = FULL,
    ) -> MegaSRPipeline:
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
        use_precision(pipeline, precision)
        pipeline.identity = ModelIdentity(
            family,
            f"random {name} preset",
            str(torch_dtype).removeprefix("torch."),
            (f"random weights of the {name} preset",),
            extractors.tagger_name if extractors is not None else None,
            precision,
        )
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
        sampler: str = DDPM,
        cfg_interval: tuple[float, float] | None = None,
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
                to ``self.min_work_side``) would exceed this many pixels (``WorkBoundsError``, a ``ValueError``);
                ``None`` = ``self.max_output_pixels``.
            max_batch_size: at most this many images per model batch (default: all that share a
                size bucket).
            profile: synchronize the GPU between stages so ``timings`` are exact.
            sampler: ``ddpm`` (the paper's; the default), or an opt-in fast solver, ``dpmpp-2m``
                or ``unipc`` (``samplers``), which needs fewer steps (its own default: 25 or 20)
                and changes the output.
            cfg_interval: (start, end) fractions of the schedule; only the steps whose position
                lies in [start, end) run classifier-free guidance, the others run the positive
                half alone (half the model batch). ``None`` = every step (the paper's).
        """
        # 1. Check every argument before touching any image; the family fills in what is not given.
        inputs = self.check_inputs(
            images,
            scale,
            num_inference_steps,
            guidance_scale,
            prompt,
            negative_prompt,
            generator,
            seed,
            color_fix,
            tile_size,
            tile_overlap,
            vae_tile_size,
            controlnet_scale,
            start_timestep,
            max_cached_tiles,
            tile_batch_size,
            max_pixels,
            max_output_pixels,
            max_batch_size,
            sampler,
            cfg_interval,
        )
        timer = StageTimer(self.device, sync=profile)
        # 2. Decode the inputs (orientation, modes, alpha); refuse any whose work would exceed the bound.
        with timer.stage("decode_inputs"):
            prepared = self._decode_inputs(inputs)
        # 3. Batches: images whose padded working size (their bucket) is the same run together.
        batches = group_by_bucket(prepared, inputs.scales, self.geometry, inputs.max_batch_size)
        results: list[Image.Image | None] = [None] * len(prepared)
        prompts: list[str] = [""] * len(prepared)
        cancelled: list[int] = []
        total_steps = inputs.steps * len(batches)
        try:
            for batch_number, batch in enumerate(batches):
                done_steps = batch_number * inputs.steps
                # 4. Bicubic ×scale per image (the ControlNet condition and the colour reference), padded to
                # the bucket. The padding sits bottom/right, so cropping gives each image back.
                with timer.stage("preprocess"):
                    control = self._upscale_lr(batch)
                # 5. Guidance extractors on the LR (batched over images of one LR size).
                with timer.stage("extractors"):
                    guidance, image_tokens, tags = self._run_extractors(batch.items, batch.padded)
                run = RunningBatch(
                    list(batch.items),
                    [inputs.generators[item.index] for item in batch.items],
                    control,
                    guidance,
                    image_tokens,
                )
                # 6. Prompts: tags + the user's prompt + SeeSR's quality suffix; CFG pairs [negative, positive].
                with timer.stage("text_encoding"):
                    run.prompts = [
                        self.family.prompt(t, inputs.prompts[item.index]) for t, item in zip(tags, run.items)
                    ]
                    run.positive, run.negative = self._encode_prompts(run.prompts, inputs)
                for item, text in zip(run.items, run.prompts):  # each image's, kept even if it is cancelled
                    prompts[item.index] = text
                # Static shapes (CUDA graphs, compile): padding rows fill the batch to its bucket size.
                run.pad_to(padded_batch_size(len(run.items), self.batch_buckets, inputs.max_batch_size))
                # 7. LRE start (SeeSR): the VAE latent of the upscaled LR noised to ``start_timestep`` (999;
                # None = the sampler's first timestep); the schedule then runs from its own first timestep.
                with timer.stage("vae_encode"):
                    run.latents = self._lre_start(run, inputs)
                    run.sampler = make_sampler(
                        inputs.sampler,
                        self.scheduler,
                        inputs.steps,
                        run.generators,
                        tuple(run.latents.shape),
                        run.latents.dtype,
                        self.device,
                    )
                # 8. Denoising loop with classifier-free guidance, tiled when large. Before every step
                # ``should_cancel`` may stop the call and ``is_cancelled`` may drop images from the batch.
                # Nothing in the loop waits for the GPU: progress comes from events (``StepPacer``).
                tile_list = self._denoising_tiles(run.latents, inputs)
                report = (lambda step, base=done_steps: callback(base + step, total_steps)) if callback else None
                pacer = StepPacer(self.device, on_done=report or (lambda step: None))
                with timer.stage("denoise"):
                    for index, t in enumerate(run.sampler.timesteps):
                        if should_cancel is not None and should_cancel():
                            raise PipelineCancelled(f"cancelled before step {index + 1} of {inputs.steps}")
                        cancelled += run.drop_cancelled(is_cancelled)
                        if not run.items:
                            break
                        run.latents = self._denoise_step(run, index, t, tile_list, inputs)
                        pacer.launched(index + 1)
                    pacer.finish()
                timer.steps += pacer.durations
                if not run.items:  # every image of the batch was cancelled: nothing to decode
                    continue
                # 9. VAE decode (tiled when large).
                with timer.stage("vae_decode"):
                    decoded = self._decode_latents(run.latents, inputs.vae_tiles[1])
                # 10. Per image: crop, colour fix against its upscaled LR, exact output size, alpha.
                with timer.stage("postprocess"):
                    for item, image in self._postprocess(run, decoded, prepared, inputs.color_fix):
                        results[item.index] = image
        finally:
            self.denoiser.clear_caches()  # the CSMs' cached image keys/values of this call
        return MegaSRPipelineOutput(
            images=results, prompts=prompts, timings=timer.timings(), cancelled=sorted(cancelled)
        )

    # ------------------------------------------------------------------ 1. check_inputs
    def check_inputs(
        self,
        images: ImageInput | PreparedImage | Sequence[ImageInput | PreparedImage],
        scale: float | Sequence[float],
        num_inference_steps: int | None,
        guidance_scale: float | None,
        prompt: str | Sequence[str],
        negative_prompt: str,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        seed: int | Sequence[int] | None,
        color_fix: str,
        tile_size: int | None,
        tile_overlap: int | None,
        vae_tile_size: int | None,
        controlnet_scale: float,
        start_timestep: int | None,
        max_cached_tiles: int,
        tile_batch_size: int,
        max_pixels: int | None,
        max_output_pixels: int | None,
        max_batch_size: int | None,
        sampler: str = DDPM,
        cfg_interval: tuple[float, float] | None = None,
    ) -> CheckedInputs:
        """Check every argument of :meth:`__call__` (``ValueError``; ``InvalidImageError`` for no images).

        Returns them with the family's defaults filled in and one scale, prompt and generator per image.
        """
        defaults = self.family.defaults
        message = sampler_problem(sampler)
        if message is not None:
            raise ValueError(f"sampler {message}")
        steps = default_steps(sampler, defaults.steps) if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        tile_overlap = defaults.tile_overlap if tile_overlap is None else tile_overlap
        vae_tiles = (
            (defaults.vae_encode_tile, defaults.vae_decode_tile)
            if vae_tile_size is None
            else (vae_tile_size, vae_tile_size)
        )
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        if not sources:
            raise InvalidImageError("no images given")
        scales = per_image("scale", scale, len(sources))
        prompts = per_image("prompt", prompt, len(sources))
        for name, value, problem in (
            *(("scale", value, scale_problem) for value in scales),
            ("num_inference_steps", steps, steps_problem),
            ("guidance_scale", guidance_scale, guidance_scale_problem),
            ("color_fix", color_fix, color_fix_problem),
            ("tile_size", tile_size, tile_size_problem),
            ("cfg_interval", cfg_interval, cfg_interval_problem),
        ):
            message = problem(value)
            if message is not None:
                raise ValueError(f"{name} {message}")
        if not isinstance(tile_overlap, int) or tile_overlap < 0 or (tile_size and tile_overlap >= tile_size):
            raise ValueError(f"tile_overlap must be ≥ 0 and smaller than tile_size, got {tile_overlap!r}")
        if not isinstance(vae_tiles[0], int) or vae_tiles[0] < 64:
            raise ValueError(f"vae_tile_size must be at least 64 pixels, got {vae_tiles[0]!r}")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if start_timestep is not None:
            # Noising below the first timestep would leave the first steps denoising noise that is not there.
            last = self.scheduler.config.num_train_timesteps - 1
            if (
                isinstance(start_timestep, bool)
                or not isinstance(start_timestep, int)
                or not 0 <= start_timestep <= last
            ):
                raise ValueError(f"start_timestep must be None or an integer from 0 to {last}, got {start_timestep!r}")
            first = first_timestep(sampler, self.scheduler, steps)
            if start_timestep < first:
                raise ValueError(
                    f"start_timestep {start_timestep} is below the first of the {steps} {sampler} timesteps ({first})"
                )
        if isinstance(tile_batch_size, bool) or not isinstance(tile_batch_size, int) or tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be a positive integer, got {tile_batch_size!r}")
        return CheckedInputs(
            sources=sources,
            scales=scales,
            prompts=prompts,
            generators=image_generators(generator, seed, len(sources)),
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            color_fix=color_fix,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            vae_tiles=vae_tiles,
            controlnet_scale=controlnet_scale,
            start_timestep=start_timestep,
            max_cached_tiles=max_cached_tiles,
            tile_batch_size=tile_batch_size,
            max_pixels=max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS,
            max_output_pixels=max_output_pixels if max_output_pixels is not None else self.max_output_pixels,
            max_batch_size=max_batch_size,
            sampler=sampler,
            cfg_interval=None if cfg_interval is None else (float(cfg_interval[0]), float(cfg_interval[1])),
        )

    # ------------------------------------------------------------------ 2.-3. inputs and batches
    def _decode_inputs(self, inputs: CheckedInputs) -> list[PreparedImage]:
        """Load every input (``PreparedImage`` as given) and check it against the work bounds."""
        prepared = [
            source if isinstance(source, PreparedImage) else load_image(source, max_pixels=inputs.max_pixels)
            for source in inputs.sources
        ]
        for image, image_scale in zip(prepared, inputs.scales):
            check_work_bounds(
                image.size, image_scale, self.size_multiple, inputs.max_output_pixels, min_side=self.min_work_side
            )
        return prepared

    def geometry(self, size: tuple[int, int], scale: float) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(target, work, bucket) as (height, width) for an LR image of ``size`` = (width, height).

        ``target`` is the output size; ``work`` the size the model runs at (SeeSR: a short side
        that would end below the model's native resolution, 512 px for SD2-base, is enlarged to it
        first); ``bucket`` the work size padded to
        the model's multiple. Images with the same bucket can share a batch.
        """
        sizes = canvas(size, scale, self.size_multiple, self.min_work_side)  # the rule the API admits jobs by
        return sizes.target, sizes.work, sizes.bucket

    # ------------------------------------------------------------------ 4.-10. the steps of one batch
    def _upscale_lr(self, batch: Batch) -> torch.Tensor:
        """Each LR bicubically resized to its working size, padded to the batch's bucket."""
        return torch.cat(
            [
                pad_to(
                    F.interpolate(
                        item.lr[None].to(self.device), size=item.work, mode="bicubic", align_corners=False
                    ).clamp(0, 1),
                    batch.padded,
                )
                for item in batch.items
            ]
        )

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
            for key, value in out.maps().items()
            if key in config.guidance_keys
        }
        if source == "ram":
            tokens = out.ram_embeds
        else:
            tokens = (
                out.image_tokens.to(self.denoiser.dtype)
                if (out.image_tokens is not None and source == "clip")
                else None
            )
        tags = out.tags if out.tags is not None else [[] for _ in range(lr.shape[0])]
        return guidance, tokens, tags

    def _run_extractors(self, items: list[BatchItem], padded: tuple[int, int]):
        """Guidance maps padded to the bucket, CLIP image tokens and tags, in ``items`` order.

        The extractors see each LR at its own size: images that share an LR and working size run
        as one extractor batch, so a batch mate never changes what an image's extractors see.
        """
        maps: dict[str, list[torch.Tensor | None]] = {}
        tokens: list[torch.Tensor | None] = [None] * len(items)
        tags: list[list[str]] = [[] for _ in items]
        for (_, work), rows in extractor_groups(items).items():
            lr = torch.stack([items[r].lr for r in rows]).to(self.device)
            guidance, group_tokens, group_tags = self.extract_guidance(lr, work)
            for key, value in guidance.items():
                padded_maps = pad_to(value, padded)
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

    def _encode_prompts(self, prompts: list[str], inputs: CheckedInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text tokens of the prompts, and of the negative prompt when classifier-free guidance runs."""
        positive = self._encode_text(prompts)
        negative = self._encode_text([inputs.negative_prompt] * len(prompts)) if inputs.do_cfg else None
        return positive, negative

    def _lre_start(self, run: RunningBatch, inputs: CheckedInputs) -> torch.Tensor:
        """The start latents: each image's VAE latent noised to ``start_timestep``, from its own generator."""
        latents = self._encode_image(run.control.to(self.denoiser.dtype), inputs.vae_tiles[0], run.generators)
        noise = randn_per_image(latents.shape, run.generators).to(self.device, latents.dtype)
        start = inputs.start_timestep
        if start is None:
            start = first_timestep(inputs.sampler, self.scheduler, inputs.steps)
        return lre_start(self.scheduler, latents, noise, start)

    def _denoising_tiles(self, latents: torch.Tensor, inputs: CheckedInputs) -> list[Tile]:
        """The latent tiles the noise is predicted in (one tile covering all when the image is small).

        Auto: the family's rule. MegaSR: one pass up to a 128-latent side (1024 px), beyond it
        96-latent tiles (a threshold at the tile size itself would run two near-full tiles for a
        97-latent image). SeeSR: 96-latent tiles once the latent has more than 96² pixels.
        """
        height, width = latents.shape[-2:]
        defaults = self.family.defaults
        tile = inputs.tile_size
        if tile is None:
            tile = defaults.tile_size if defaults.needs_tiling(height, width) else 0
        return tiles(height, width, tile, inputs.tile_overlap) if tile else [Tile(0, height, 0, width)]

    def _denoise_step(
        self, run: RunningBatch, index: int, t: torch.Tensor, tile_list: list[Tile], inputs: CheckedInputs
    ) -> torch.Tensor:
        """Step ``index`` of the batch: the noise predicted tile group by tile group, blended, then stepped.

        Conditioning per group of tiles, with the maps once for both CFG halves. Kept across steps
        (each MSFM computes its modulation once) up to ``max_cached_tiles``; beyond that memory
        would grow with the image, so the modulation is recomputed at every step instead.
        """
        reuse = len(tile_list) <= inputs.max_cached_tiles
        whole = Tile(0, run.latents.shape[-2], 0, run.latents.shape[-1])
        if self.denoiser_graphs is not None and tile_list == [whole] and isinstance(run.sampler, DeviceDDPM):
            return self._graphed_step(run, index, t, whole, inputs, reuse)
        predict_many = partial(
            self._predict_noise, run=run, t=t, inputs=inputs, reuse_conditioning=reuse, do_cfg=inputs.cfg_at(index)
        )
        noise_pred = blend_tiles(run.latents, tile_list, predict_many=predict_many, group_size=inputs.tile_batch_size)
        assert run.sampler is not None
        return run.sampler.step(index, noise_pred, run.latents)

    def _graphed_step(
        self, run: RunningBatch, index: int, t: torch.Tensor, whole: Tile, inputs: CheckedInputs, reuse: bool
    ) -> torch.Tensor:
        """Step ``index`` of an untiled batch as one CUDA graph: the model batch as ``_predict_noise``
        builds it, the denoiser, CFG and the DDPM update (``DenoiserGraphs.step``)."""
        assert self.denoiser_graphs is not None and isinstance(run.sampler, DeviceDDPM)
        do_cfg = inputs.cfg_at(index)
        latents, texts, controls, conditioning = self._model_batch(run, [whole], do_cfg, reuse)
        coefficients, noise = run.sampler.step_inputs(index)
        return self.denoiser_graphs.step(
            latents,
            t,
            texts,
            control_image=controls,
            conditioning=conditioning,
            conditioning_scale=inputs.controlnet_scale,
            update=StepUpdate(
                inputs.guidance_scale if do_cfg else None,
                run.sampler.update,
                run.sampler.update_key,
                coefficients,
                noise,
            ),
        )

    def _predict_noise(
        self,
        group: list[Tile],
        *,
        run: RunningBatch,
        t: torch.Tensor,
        inputs: CheckedInputs,
        reuse_conditioning: bool,
        do_cfg: bool,
    ) -> list[torch.Tensor]:
        """One model batch for the tiles of ``group``: [negative halves of every tile; positive halves of
        every tile], so each tile's images line up with its maps; CFG combines the halves (without
        CFG at this step: the positive halves alone)."""
        latents, texts, controls, conditioning = self._model_batch(run, group, do_cfg, reuse_conditioning)
        eps = (self.denoiser_graphs or self.denoiser)(
            guidance_batch(latents, do_cfg),
            t,
            texts,
            control_image=controls,
            conditioning=conditioning,
            conditioning_scale=inputs.controlnet_scale,
        )
        if do_cfg:
            eps = classifier_free_guidance(eps, inputs.guidance_scale)
        return list(eps.chunk(len(group)))

    def _model_batch(self, run: RunningBatch, group: list[Tile], do_cfg: bool, reuse: bool):
        """What the denoiser takes for the tiles of ``group``: their latents (each tile's images in
        turn; the caller doubles them for CFG), the text tokens and ControlNet images of the model
        batch ([negative halves of every tile; positive halves] with CFG), and the conditioning."""
        count, repeat = len(group), 2 if do_cfg else 1
        latents = torch.cat([part.crop(run.latents) for part in group])
        texts = [run.positive] * count
        if do_cfg:
            texts = [run.negative] * count + texts
        controls = torch.cat([part.pixels(self.vae_scale_factor).crop(run.control) for part in group])
        conditioning = self._tile_conditioning(run, tuple(group), latents.shape[0] * repeat, reuse, repeat=repeat)
        return latents, torch.cat(texts), guidance_batch(controls.to(self.denoiser.dtype), do_cfg), conditioning

    def _tile_conditioning(self, run: RunningBatch, group: tuple[Tile, ...], batch_size: int, reuse: bool, repeat: int):
        """The denoiser's conditioning for a group of tiles (with or without the CFG halves), cached in
        ``run`` when ``reuse``."""
        key = (group, repeat)
        if key in run.conditionings:
            return run.conditionings[key]
        pixels = [part.pixels(self.vae_scale_factor) for part in group]
        tokens = torch.cat([run.image_tokens] * len(group)) if run.image_tokens is not None else None
        made = self.denoiser.prepare_conditioning(
            tokens,
            {k: torch.cat([p.crop(v) for p in pixels]) for k, v in run.guidance.items()},
            batch_size,
            reuse_modulation=reuse,
            repeat=repeat,
        )
        if reuse:
            run.conditionings[key] = made
        return made

    def _postprocess(
        self, run: RunningBatch, decoded: torch.Tensor, prepared: list[PreparedImage], method: str
    ) -> Iterator[tuple[BatchItem, Image.Image]]:
        """Each image cropped to its work size, colour-fixed, resized to its target, alpha back on."""
        for row, item in enumerate(run.items):
            if item.padding:
                continue
            work_h, work_w = item.work
            image = decoded[row : row + 1, :, :work_h, :work_w].float()
            image = color_fix(image, run.control[row : row + 1, :, :work_h, :work_w].float(), method)
            if item.work != item.target:
                image = F.interpolate(
                    image, size=item.target, mode="bicubic", align_corners=False, antialias=True
                ).clamp(0, 1)
            alpha = prepared[item.index].alpha
            if alpha is not None:
                alpha = resize_alpha(alpha, (item.target[1], item.target[0]))
            yield item, to_pil(image[0], alpha)

    # ------------------------------------------------------------------ shared by the steps
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
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
        noise = randn_per_image(posterior.mean.shape, generators).to(posterior.mean.device, posterior.mean.dtype)
        return (posterior.mean + posterior.std * noise) * self.vae.config.scaling_factor

    def _decode_latents(self, latents: torch.Tensor, vae_tile_size: int) -> torch.Tensor:
        pixels = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        self._configure_vae_tiling(pixels, vae_tile_size)
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((image.float() + 1) / 2).clamp(0, 1)
