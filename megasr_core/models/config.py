"""A weights folder's model configuration (``megasr.json``): its family, and what it adds to SD2.

The base networks (UNet, ControlNet) keep their diffusers configs; these objects hold only what
a family adds on top. :class:`MegaSRConfig` holds MegaSR's modules and the ablation switches of
the paper's Tables 2-4; :class:`SeeSRConfig` the width of SeeSR's image cross-attentions. The
file is saved as ``megasr.json`` next to ``unet/`` and ``controlnet/``; its ``family`` key says
which of the two it is (:func:`load_model_config`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..families import CONFIG_NAME, DEFAULT_FAMILY, MEGASR, SEESR, SEESR_TURBO

FORMAT_VERSION = 1


class _FileConfig:
    """``to_dict`` / ``from_dict`` / ``save`` / ``load`` of a frozen dataclass kept in ``megasr.json``."""

    #: the families this class configures (the first is its default)
    FAMILIES: ClassVar[tuple[str, ...]] = ()

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data.setdefault("family", self.FAMILIES[0])
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"{CONFIG_NAME} has format_version {version}; this megasr reads up to {FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        family = data.get("family", DEFAULT_FAMILY)
        if family not in cls.FAMILIES:
            raise ValueError(f"{CONFIG_NAME} is of family {family!r}, not one of {', '.join(cls.FAMILIES)}")
        if "family" not in known:
            data.pop("family", None)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields in {CONFIG_NAME}: {', '.join(unknown)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path):
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a megasr weights directory")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class MegaSRConfig(_FileConfig):
    """Switches and sizes of the modules MegaSR installs on the UNet and ControlNet.

    Attributes:
        preset: name of the preset the base shapes came from (informational).
        image_embed_dim: width of the CLIP image tokens fed to the CSM connectors (1024 for
            ViT-H/14's projected tokens; 1280 for its raw hidden states).
        num_image_tokens: number of CLIP image tokens (257 for ViT-H/14 at 224); informational,
            the CSM accepts any token count.
        use_csm: install the customized semantics module (paper: CISM^2). Off = "w/o CSM".
        use_guidance: install the multimodal signal fusion module (paper: MS-GAM) at all.
        use_hed: the HED branch (SAFT on the edge map) of the MSFM.
        use_depth_seg: stage 1 (depth + segmentation fusion) and its SAFT.
        msfm_hidden_channels: width of the SAFT "MLP" (shared conv) on the guidance map.
        msfm_attention_reduction: hidden width of the stage-1 channel attention.
        depth_channels / seg_channels / hed_channels: channels of the guidance maps.
    """

    FAMILIES: ClassVar[tuple[str, ...]] = (MEGASR,)

    preset: str = "custom"
    image_embed_dim: int = 1024
    num_image_tokens: int = 257
    use_csm: bool = True
    use_guidance: bool = True
    use_hed: bool = True
    use_depth_seg: bool = True
    msfm_hidden_channels: int = 128
    msfm_attention_hidden: int = 16
    hed_channels: int = 1
    depth_channels: int = 1
    seg_channels: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def msfm_enabled(self) -> bool:
        """Whether any MSFM is installed (some guidance branch is on)."""
        return self.use_guidance and (self.use_hed or self.use_depth_seg)

    @property
    def hed_enabled(self) -> bool:
        return self.use_guidance and self.use_hed

    @property
    def depth_seg_enabled(self) -> bool:
        return self.use_guidance and self.use_depth_seg

    @property
    def depth_seg_channels(self) -> int:
        return self.depth_channels + self.seg_channels

    @property
    def guidance_keys(self) -> tuple[str, ...]:
        """Guidance maps this model consumes; extractors for other maps need not run."""
        keys: list[str] = []
        if self.hed_enabled:
            keys.append("hed")
        if self.depth_seg_enabled:
            keys += ["depth", "seg"]
        return tuple(keys)

    @property
    def family(self) -> str:
        return MEGASR


@dataclass(frozen=True)
class SeeSRConfig(_FileConfig):
    """SeeSR and SeeSR-Turbo: only the width of the image cross-attentions' keys and values.

    Attributes:
        family: ``seesr`` (SD2-base, 50 steps with CFG) or ``seesr-turbo`` (sd-turbo, 2 steps).
        preset: name of the preset the base shapes came from (informational).
        image_embed_dim: width of RAM's image embeddings the image cross-attentions attend to
            (512: RAM's ``image_proj``; SeeSR's code fixes it).
        num_image_tokens: RAM's tokens per image (145 at 384²); informational.
    """

    FAMILIES: ClassVar[tuple[str, ...]] = (SEESR, SEESR_TURBO)

    family: str = SEESR
    preset: str = "custom"
    image_embed_dim: int = 512
    num_image_tokens: int = 145
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in self.FAMILIES:
            raise ValueError(f"SeeSRConfig.family must be one of {', '.join(self.FAMILIES)}, got {self.family!r}")

    #: SeeSR has none of MegaSR's modules: no CSM, no guidance maps
    use_csm: ClassVar[bool] = False
    guidance_keys: ClassVar[tuple[str, ...]] = ()


def load_model_config(directory: str | Path) -> MegaSRConfig | SeeSRConfig:
    """The config in ``directory/megasr.json``, of the class its ``family`` names."""
    from ..families import read_family

    family = read_family(directory)
    cls = MegaSRConfig if family in MegaSRConfig.FAMILIES else SeeSRConfig
    return cls.load(directory)
