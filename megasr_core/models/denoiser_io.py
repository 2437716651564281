"""How ``MegaSRDenoiser`` lies on disk: its weights folder and its overlay checkpoint.

Kept apart from the network (``denoiser.py``), as diffusers keeps ``modeling_utils`` apart from
its models: :class:`MegaSRWeightsIO` is a mixin of the load/save class methods, and the network
module holds only construction and the forward pass.

Every original state-dict key is unchanged (real SD2-base weights load as they are); MegaSR's
modules live under new keys containing ``.csm.`` or ``.msfm.``. The folder written by
:meth:`MegaSRWeightsIO.save_pretrained`::

    megasr.json                                   MegaSRConfig
    unet/config.json                              diffusers UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors      base UNet keys only (a valid diffusers folder)
    unet/megasr_modules.safetensors               the UNet's CSM/MSFM keys
    controlnet/...                                the same for the ControlNet

An overlay (:meth:`MegaSRWeightsIO.save_overlay`) holds only what training changes (the
ControlNet and MegaSR's modules) plus both configs in its metadata; with a vanilla SD2-base UNet
it rebuilds the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ..weights.files import (
    MEGASR_MODULES_NAME,
    WEIGHTS_NAME,
    WeightsError,
    check_state_dict,
    load_assign,
    read_model_dir,
    read_safetensors_metadata,
    read_weights,
    write_safetensors,
)
from .config import MegaSRConfig

if TYPE_CHECKING:
    from .denoiser import MegaSRDenoiser

NETWORKS = ("unet", "controlnet")
OVERLAY_FORMAT = "megasr-overlay"
_SHARED_SHAPE_FIELDS = (
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "in_channels",
)

_Model = TypeVar("_Model", bound="MegaSRDenoiser")


def is_megasr_key(name: str) -> bool:
    """Whether a parameter/state-dict name belongs to a module MegaSR added."""
    parts = name.split(".")
    return "csm" in parts or "msfm" in parts


class MegaSRWeightsIO:
    """Load and save of :class:`~megasr_core.models.denoiser.MegaSRDenoiser` (its mixin)."""

    @classmethod
    def from_pretrained(
        cls: type[_Model],
        directory: str | Path,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> _Model:
        """Load a directory written by :meth:`save_pretrained` (strict: every key must match)."""
        directory = Path(directory)
        config = MegaSRConfig.load(directory)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(directory / "unet"))
            controlnet = ControlNetModel.from_config(ControlNetModel.load_config(directory / "controlnet"))
            model = cls(unet, controlnet, config)
        state: dict[str, torch.Tensor] = {}
        for net in NETWORKS:
            base = read_model_dir(directory / net)
            modules_file = directory / net / MEGASR_MODULES_NAME
            extra = read_weights([modules_file]) if modules_file.is_file() else {}
            overlap = sorted(set(base) & set(extra))
            if overlap:
                raise WeightsError(f"{directory / net}: keys in both weight files: {', '.join(overlap[:12])}")
            state.update({f"{net}.{k}": v for k, v in (base | extra).items()})
        model._load_full(state, what=str(directory))
        return model.to(device=device or "cpu", dtype=torch_dtype or torch.float32)

    @classmethod
    def from_unet_pretrained(
        cls: type[_Model],
        unet_directory: str | Path,
        config: MegaSRConfig | None = None,
        controlnet_directory: str | Path | None = None,
        overlay: str | Path | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> _Model:
        """Build from a diffusers-format SD2 ``unet/`` folder (e.g. stable-diffusion-2-base).

        The ControlNet is initialized from the UNet (or loaded from ``controlnet_directory``),
        MegaSR's modules are freshly initialized. With an ``overlay`` checkpoint the ControlNet
        and MegaSR's modules come from it instead (its config too, unless ``config`` is given).
        """
        unet_directory = Path(unet_directory)
        if overlay is not None:
            config = config or overlay_config(overlay)
        config = config or MegaSRConfig()
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_directory))
        load_assign(unet, read_model_dir(unet_directory), f"UNet weights in {unet_directory}")
        if overlay is not None:
            # The overlay carries the whole trained ControlNet: build it empty, fill it from there.
            controlnet_config = overlay_controlnet_config(overlay)
            _check_controlnet_fits_unet(controlnet_config, unet.config, str(overlay))
            with torch.device("meta"):
                controlnet = ControlNetModel.from_config(controlnet_config)
        elif controlnet_directory is not None:
            controlnet_directory = Path(controlnet_directory)
            with torch.device("meta"):
                controlnet = ControlNetModel.from_config(ControlNetModel.load_config(controlnet_directory))
            load_assign(
                controlnet, read_model_dir(controlnet_directory), f"ControlNet weights in {controlnet_directory}"
            )
        else:
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels)
            )
        model = cls(unet, controlnet, config)
        if overlay is not None:
            model.load_overlay(overlay, assign=True)
        return model.to(device=device or "cpu", dtype=torch_dtype or torch.float32)

    def save_pretrained(self: MegaSRDenoiser, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        for net in NETWORKS:
            model = getattr(self, net)
            model.save_config(directory / net)
            state = model.state_dict()
            base = {k: v for k, v in state.items() if not is_megasr_key(k)}
            extra = {k: v for k, v in state.items() if is_megasr_key(k)}
            write_safetensors(directory / net / f"{WEIGHTS_NAME}.safetensors", base, {"format": "pt"})
            if extra:
                write_safetensors(directory / net / MEGASR_MODULES_NAME, extra, {"format": "pt"})

    def overlay_state_dict(self: MegaSRDenoiser) -> dict[str, torch.Tensor]:
        """MegaSR's own keys and every trained key: UNet CSM/MSFM and the whole ControlNet."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("controlnet.") or is_megasr_key(k)}

    def save_overlay(self: MegaSRDenoiser, path: str | Path) -> Path:
        """Write the small checkpoint that, with a vanilla SD2-base UNet, rebuilds this model."""
        path = Path(path)
        metadata = {
            "format": OVERLAY_FORMAT,
            "megasr_config": json.dumps(self.config.to_dict(), sort_keys=True),
            "controlnet_config": json.dumps(dict(self.controlnet.config), default=list, sort_keys=True),
        }
        write_safetensors(path, self.overlay_state_dict(), metadata)
        return path

    def load_overlay(self: MegaSRDenoiser, path: str | Path, assign: bool = False) -> None:
        """Replace MegaSR's modules and the ControlNet with an overlay's values (strict).

        ``assign=True`` takes over the file's tensors (for modules built on the meta device).
        """
        path = Path(path)
        theirs = overlay_config(path)
        ours = self.config
        structural = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("preset", "extra")}  # noqa: E731
        if structural(theirs) != structural(ours):
            diff = sorted(k for k in structural(ours) if structural(ours)[k] != structural(theirs).get(k))
            raise WeightsError(f"{path}: overlay was made for a different MegaSR config (differs in {', '.join(diff)})")
        state = read_weights([path])
        expected = {k: v.shape for k, v in self.overlay_state_dict().items()}
        check_state_dict(expected, state, f"overlay {path}")
        if not assign:
            self.load_state_dict(state, strict=False)
            return
        self.load_state_dict(state, strict=False, assign=True)
        self.apply_trainable_flags()
        leftovers = [n for n, t in self.state_dict().items() if t.is_meta]
        if leftovers:
            raise WeightsError(f"overlay {path}: tensors left uninitialized: {', '.join(leftovers[:12])}")

    def _load_full(self: MegaSRDenoiser, state: dict[str, torch.Tensor], what: str) -> None:
        load_assign(self, state, what)
        self.apply_trainable_flags()


def overlay_config(path: str | Path) -> MegaSRConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"overlay checkpoint {path} not found")
    metadata = read_safetensors_metadata(path)
    if metadata.get("format") != OVERLAY_FORMAT or "megasr_config" not in metadata:
        raise WeightsError(f"{path} is not a MegaSR overlay checkpoint (missing format metadata)")
    return MegaSRConfig.from_dict(json.loads(metadata["megasr_config"]))


def overlay_controlnet_config(path: str | Path) -> dict:
    metadata = read_safetensors_metadata(Path(path))
    if "controlnet_config" not in metadata:
        raise WeightsError(f"{path} has no ControlNet config in its metadata")
    return json.loads(metadata["controlnet_config"])


def _check_controlnet_fits_unet(controlnet_config: Mapping, unet_config: Mapping, what: str) -> None:
    def norm(value: object) -> object:
        return list(value) if isinstance(value, (list, tuple)) else value

    bad = [f for f in _SHARED_SHAPE_FIELDS if norm(controlnet_config.get(f)) != norm(unet_config.get(f))]
    if bad:
        raise WeightsError(f"{what}: ControlNet does not fit this UNet (differs in {', '.join(bad)})")
