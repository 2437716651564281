"""All five guidance extractors behind one call, loaded once from a weights directory.

``GuidanceExtractors(images)`` returns what the denoiser and the prompt need:
``hed B×1×H×W``, ``depth B×1×H×W``, ``seg B×3×H×W`` (all in [0, 1], at the input's size),
CLIP image tokens ``B×N×D`` and per-image tags. Any extractor can be absent or switched off.

Directory layout (``<weights>/extractors/``)::

    hed/            config.json + model.safetensors, or the upstream ControlNetHED.pth
    depth/          transformers DepthAnythingForDepthEstimation (+ lora/ adapter, merged at load)
    segmentation/   transformers Mask2FormerForUniversalSegmentation
    clip/           transformers CLIPModel (+ tokenizer files; + lora/ adapter, merged at load)
    tagger/         RAM (+ DAPE, merged): tagger.json of type "ram" + model.safetensors, tags.txt,
                    thresholds.txt. Without it, the CLIP zero-shot fallback (tagger.json of type
                    "clip-zero-shot" or nothing; RAM's vocabulary when absent) over clip/.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTokenizer

from ..utils import DeviceDtypeMixin
from .base import check_images, values_checked
from .clip_image import CLIPImageEncoder
from .depth import DepthExtractor
from .hed import HEDExtractor
from .lora import ADAPTER_DIR, load_lora, merge_lora
from .presets import ExtractorPreset, tiny_preset
from .ram import RAMConfig, RAMTagger, is_ram_folder
from .segmentation import SegmentationExtractor
from .tagger import CLIPZeroShotTagger, Tagger

NAMES = ("hed", "depth", "segmentation", "clip", "tagger")

logger = logging.getLogger(__name__)


@dataclass
class GuidanceOutput:
    hed: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    seg: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    #: RAM's image embeddings ``B×(1+L)×512`` (SeeSR's image-attention tokens), when asked for
    ram_embeds: torch.Tensor | None = None
    tags: list[list[str]] | None = None
    #: which tagger produced ``tags`` ("ram" or "clip-zero-shot"), for logs and job records
    tagger: str | None = None

    def maps(self) -> dict[str, torch.Tensor]:
        """The ``guidance`` dict of :class:`MegaSRDenoiser` (absent signals left out)."""
        return {k: v for k, v in (("hed", self.hed), ("depth", self.depth), ("seg", self.seg)) if v is not None}


class GuidanceExtractors(DeviceDtypeMixin, nn.Module):
    """The HED, depth, segmentation and CLIP extractors plus a tagger; each optional."""

    def __init__(
        self,
        hed: HEDExtractor | None = None,
        depth: DepthExtractor | None = None,
        segmentation: SegmentationExtractor | None = None,
        clip: CLIPImageEncoder | None = None,
        tagger: Tagger | None = None,
        enabled: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        self.hed = hed
        self.depth = depth
        self.segmentation = segmentation
        self.clip = clip  # the tagger may use it even when image tokens are not enabled
        self.tagger = tagger  # RAM is a submodule; the CLIP fallback shares the CLIP towers
        self.enabled = tuple(n for n in NAMES if n in set(self.available if enabled is None else enabled))

    @property
    def tagger_name(self) -> str | None:
        """``"ram"``, ``"clip-zero-shot"`` (the fallback), or None without a tagger."""
        return None if self.tagger is None else getattr(self.tagger, "name", type(self.tagger).__name__)

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(name for name in NAMES if getattr(self, name) is not None)

    def forward(
        self, images: torch.Tensor, enabled: Iterable[str] | None = None, ram_embeds: bool = False
    ) -> GuidanceOutput:
        """Run the extractors named in ``enabled`` (default: ``self.enabled``) on LR images in [0, 1].

        ``ram_embeds``: also return RAM's image embeddings (the tagger must be RAM and enabled).
        """
        wanted = set(self.enabled if enabled is None else enabled)
        unknown = wanted - set(NAMES)
        if unknown:
            raise ValueError(f"unknown extractors {sorted(unknown)}; choose from {list(NAMES)}")
        missing = sorted(wanted - set(self.available))
        if missing:
            raise ValueError(f"extractors {missing} are not loaded")
        if ram_embeds and ("tagger" not in wanted or not isinstance(self.tagger, RAMTagger)):
            raise ValueError(
                f"RAM's image embeddings need the RAM tagger (extractors/tagger/); this one is "
                f"{self.tagger_name or 'missing'}"
            )
        images = check_images(images)  # the one range check: the extractors below skip theirs
        output = GuidanceOutput()
        with values_checked():
            if "hed" in wanted:
                output.hed = self.hed(images)
            if "depth" in wanted:
                output.depth = self.depth(images)
            if "segmentation" in wanted:
                output.seg = self.segmentation(images)
            if "clip" in wanted:
                output.image_tokens = self.clip(images)
            if "tagger" in wanted:
                if ram_embeds:
                    output.tags, output.ram_embeds = self.tagger.tags_and_embeds(images)
                else:
                    output.tags = self.tagger(images)
                output.tagger = self.tagger_name
                logger.debug("tags by %s for %d image(s)", output.tagger, len(output.tags))
        return output

    def parameter_counts(self) -> dict[str, int]:
        return {
            name: sum(p.numel() for p in getattr(self, name).parameters())
            for name in NAMES
            if name != "tagger" and getattr(self, name) is not None
        }

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, preset: ExtractorPreset, tokenizer: CLIPTokenizer | None = None) -> GuidanceExtractors:
        """Random-initialized extractors of a preset's shapes (a tagger only with a tokenizer)."""
        clip = CLIPImageEncoder.from_config(preset.clip)
        return cls(
            hed=HEDExtractor(preset.hed),
            depth=DepthExtractor.from_config(preset.depth, short_side=preset.depth_short_side),
            segmentation=SegmentationExtractor.from_config(
                preset.segmentation, short_side=preset.segmentation_short_side
            ),
            clip=clip,
            tagger=CLIPZeroShotTagger(clip, tokenizer) if tokenizer is not None else None,
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        enabled: Iterable[str] | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> GuidanceExtractors:
        """Load the extractors found under ``directory`` (only those in ``enabled``, if given).

        LoRA adapters saved under ``depth/lora`` and ``clip/lora`` are merged for serving.
        fp16/bf16 are meant for CUDA; on a CPU keep the default float32.
        """
        directory = Path(directory)
        wanted = set(NAMES if enabled is None else enabled)
        unknown = wanted - set(NAMES)
        if unknown:
            raise ValueError(f"unknown extractors {sorted(unknown)}; choose from {list(NAMES)}")
        if enabled is not None:
            missing = sorted(n for n in wanted if n != "tagger" and not (directory / n).is_dir())
            if missing:
                raise FileNotFoundError(f"{directory}: no folder for extractors {missing}")
        parts: dict[str, object] = {}
        if "hed" in wanted and (directory / "hed").is_dir():
            parts["hed"] = HEDExtractor.from_pretrained(directory / "hed")
        if "depth" in wanted and (directory / "depth").is_dir():
            parts["depth"] = _with_merged_lora(DepthExtractor.from_pretrained(directory / "depth"), directory / "depth")
        if "segmentation" in wanted and (directory / "segmentation").is_dir():
            parts["segmentation"] = SegmentationExtractor.from_pretrained(directory / "segmentation")
        tagger_dir = directory / "tagger"
        if "tagger" in wanted and is_ram_folder(tagger_dir):
            parts["tagger"] = RAMTagger.from_pretrained(tagger_dir)
        clip_fallback = "tagger" in wanted and "tagger" not in parts
        if ("clip" in wanted or clip_fallback) and (directory / "clip").is_dir():
            clip = _with_merged_lora(CLIPImageEncoder.from_pretrained(directory / "clip"), directory / "clip")
            parts["clip"] = clip
            if clip_fallback:
                if not clip.has_text_tower:
                    raise ValueError(f"{directory / 'clip'} has no text tower: the tagger needs a full CLIPModel")
                tokenizer = CLIPTokenizer.from_pretrained(directory / "clip")
                parts["tagger"] = CLIPZeroShotTagger.from_pretrained(
                    tagger_dir if tagger_dir.is_dir() else None, clip, tokenizer
                )
        if "tagger" in parts:
            fallback = "" if isinstance(parts["tagger"], RAMTagger) else f" (fallback: no RAM model in {tagger_dir})"
            logger.info("tagger: %s%s", getattr(parts["tagger"], "name", "?"), fallback)
        extractors = cls(**parts, enabled=wanted)
        extractors.eval().requires_grad_(False)
        return extractors.to(device=device or "cpu", dtype=torch_dtype or torch.float32)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("hed", "depth", "segmentation", "clip"):
            part = getattr(self, name)
            if part is not None:
                part.save_pretrained(directory / name)
        if isinstance(self.tagger, RAMTagger):
            self.tagger.save_pretrained(directory / "tagger")
        elif isinstance(self.tagger, CLIPZeroShotTagger):
            self.tagger.save_pretrained(directory / "tagger")
            self.tagger.tokenizer.save_pretrained(directory / "clip")


def _with_merged_lora(extractor, folder: Path):
    adapter = folder / ADAPTER_DIR
    if adapter.is_dir():
        load_lora(extractor, adapter)
        merge_lora(extractor)
    return extractor


def init_tiny_extractors(
    directory: str | Path, tokenizer: CLIPTokenizer, seed: int = 0, ram_tagger: bool = False
) -> GuidanceExtractors:
    """Write random-initialized tiny extractors (every one) to ``directory``.

    The tagger is the CLIP zero-shot fallback over RAM's vocabulary, or with ``ram_tagger`` a
    tiny random :class:`RAMTagger` (same code paths as RAM, small dims).
    """
    torch.manual_seed(seed)
    extractors = GuidanceExtractors.from_preset(tiny_preset(), tokenizer=tokenizer)
    if ram_tagger:
        extractors.tagger = tiny_random_ram(seed)
    extractors.save_pretrained(directory)
    return extractors


def tiny_random_ram(seed: int = 0) -> RAMTagger:
    """A tiny RAM with random label embeddings (RAM starts them at zero: every tag would score alike)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        tagger = RAMTagger(RAMConfig.tiny())
    with torch.no_grad():
        tagger.label_embed.copy_(torch.randn(tagger.label_embed.shape, generator=generator))
    return tagger.eval().requires_grad_(False)


def install_ram_tagger(
    extractors_dir: str | Path,
    ram_path: str | Path,
    dape_path: str | Path | None = None,
    config: RAMConfig | None = None,
) -> RAMTagger:
    """Convert RAM's release (+ DAPE, merged) into ``<extractors>/tagger/``; it then replaces the fallback."""
    tagger = RAMTagger.from_checkpoint(ram_path, dape_path, config=config)
    tagger.save_pretrained(Path(extractors_dir) / "tagger")
    return tagger
