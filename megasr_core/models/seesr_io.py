"""How ``SeeSRDenoiser`` lies on disk: SeeSR's release layout, read and written.

Kept apart from the network (``seesr.py``), as diffusers keeps ``modeling_utils`` apart from its
models: :class:`SeeSRWeightsIO` is a mixin of the load/save methods.

A SeeSR release holds ``unet/`` and ``controlnet/`` folders whose ``config.json`` carries
``use_image_cross_attention: true``; :meth:`SeeSRWeightsIO.from_pretrained` reads them (and this
project's own weights folders, which keep the same layout, plus ``megasr.json``) with strict key
checks. The image transformers' keys are SeeSR's own (``…down_blocks.N.image_attentions.M.…``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ..weights.files import WEIGHTS_NAME, WeightsError, load_assign, read_model_dir, write_safetensors
from .config import CONFIG_NAME, SeeSRConfig

if TYPE_CHECKING:
    from .seesr import SeeSRDenoiser

NETWORKS = ("unet", "controlnet")
#: the attribute (and state-dict key part) of a block's image transformers, as SeeSR names them
IMAGE_ATTENTIONS = "image_attentions"
#: the flag SeeSR's ``config.json`` files carry (SeeSR's forked model classes take it as an argument)
CONFIG_FLAG = "use_image_cross_attention"
_IMAGE_KEY = re.compile(r"(^|\.)image_attentions\.\d+\.transformer_blocks\.\d+\.attn2\.to_k\.weight$")

_Model = TypeVar("_Model", bound="SeeSRDenoiser")


class SeeSRWeightsIO:
    """Load and save of :class:`~megasr_core.models.seesr.SeeSRDenoiser` (its mixin)."""

    @classmethod
    def from_pretrained(
        cls: type[_Model],
        directory: str | Path,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        config: SeeSRConfig | None = None,
    ) -> _Model:
        """Load ``directory/unet`` and ``directory/controlnet`` as SeeSR released them (or as saved here).

        Safetensors (single, sharded, fp16 variant) or ``.bin``; every key must match. The family
        comes from ``megasr.json`` when the folder has one, else ``config``, else ``seesr``.
        """
        directory = Path(directory)
        if config is None:
            config = SeeSRConfig.load(directory) if (directory / CONFIG_NAME).is_file() else SeeSRConfig()
        return cls.from_parts(
            directory / "unet", directory / "controlnet", config=config, device=device, torch_dtype=torch_dtype
        )

    @classmethod
    def from_parts(
        cls: type[_Model],
        unet_directory: str | Path,
        controlnet_directory: str | Path,
        config: SeeSRConfig,
        base_unet_directory: str | Path | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> _Model:
        """Build from a SeeSR ``unet/`` and ``controlnet/``; with ``base_unet_directory`` (SeeSR-Turbo:
        sd-turbo's ``unet/``) the UNet's own weights and config come from there and only the
        image attentions from SeeSR's UNet, as SeeSR's ``from_pretrained_orig`` does."""
        unet_directory, controlnet_directory = Path(unet_directory), Path(controlnet_directory)
        seesr_unet = read_model_dir(unet_directory)
        unet_config = _seesr_config(unet_directory, UNet2DConditionModel)
        if base_unet_directory is not None:
            base_unet_directory = Path(base_unet_directory)
            images = {k: v for k, v in seesr_unet.items() if IMAGE_ATTENTIONS in k.split(".")}
            if not images:
                raise WeightsError(f"{unet_directory}: no image_attentions keys: not a SeeSR UNet")
            base = read_model_dir(base_unet_directory)
            unet_state = {k: v for k, v in base.items() if IMAGE_ATTENTIONS not in k.split(".")} | images
            unet_config = _config_without_flag(UNet2DConditionModel.load_config(base_unet_directory))
        else:
            unet_state = seesr_unet
        controlnet_state = read_model_dir(controlnet_directory)
        controlnet_config = _seesr_config(controlnet_directory, ControlNetModel)
        width = _image_embed_dim(unet_state, f"{unet_directory}")
        if width != config.image_embed_dim:
            config = config.replace(image_embed_dim=width)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            controlnet = ControlNetModel.from_config(controlnet_config)
            model = cls(unet, controlnet, config)
        load_assign(
            model.unet,
            unet_state,
            f"SeeSR UNet weights in {unet_directory}" + (f" with {base_unet_directory}" if base_unet_directory else ""),
        )
        load_assign(model.controlnet, controlnet_state, f"SeeSR ControlNet weights in {controlnet_directory}")
        model.requires_grad_(False)
        return model.to(device=device or "cpu", dtype=torch_dtype or torch.float32)

    def save_pretrained(self: SeeSRDenoiser, directory: str | Path) -> None:
        """``megasr.json`` plus ``unet/`` and ``controlnet/`` in SeeSR's release layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        for net in NETWORKS:
            model = getattr(self, net)
            model.save_config(directory / net)
            _add_config_flag(directory / net / "config.json")
            write_safetensors(directory / net / f"{WEIGHTS_NAME}.safetensors", model.state_dict(), {"format": "pt"})


def _config_without_flag(config: Mapping[str, Any]) -> dict[str, Any]:
    """A SeeSR ``config.json`` as diffusers' own class takes it: SeeSR's extra keys removed."""
    return {k: v for k, v in config.items() if k not in (CONFIG_FLAG, "image_cross_attention_dim")}


def _seesr_config(directory: Path, model_class: type) -> dict[str, Any]:
    config = model_class.load_config(directory)
    if not config.get(CONFIG_FLAG):
        raise WeightsError(
            f"{directory}/config.json has no '{CONFIG_FLAG}: true': not a SeeSR {model_class.__name__} "
            "(SeeSR's unet/ and controlnet/ folders carry it)"
        )
    return _config_without_flag(config)


def _add_config_flag(path: Path) -> None:
    config = json.loads(path.read_text())
    config[CONFIG_FLAG] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _image_embed_dim(state: Mapping[str, torch.Tensor], what: str) -> int:
    """The key/value width of the image cross-attentions, read off their weights."""
    widths = {tuple(v.shape)[1] for k, v in state.items() if _IMAGE_KEY.search(k)}
    if not widths:
        raise WeightsError(f"{what}: no image_attentions.*.attn2.to_k weights: not a SeeSR UNet")
    if len(widths) > 1:
        raise WeightsError(f"{what}: image attentions of different widths {sorted(widths)}")
    return widths.pop()
