"""MegaSR's own configuration: which modules exist and how wide they are.

The base networks (UNet, ControlNet) keep their diffusers configs; this object holds only what
MegaSR adds on top, plus the ablation switches of the paper's Tables 2-4. It is saved as
``megasr.json`` next to ``unet/`` and ``controlnet/``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "megasr.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MegaSRConfig:
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

    def replace(self, **changes: Any) -> "MegaSRConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MegaSRConfig":
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{CONFIG_NAME} has format_version {version}; this megasr reads up to {FORMAT_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields in {CONFIG_NAME}: {', '.join(unknown)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "MegaSRConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a MegaSR weights directory")
        return cls.from_dict(json.loads(path.read_text()))
