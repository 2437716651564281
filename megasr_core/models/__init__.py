"""MegaSR networks: the SD2 UNet + ControlNet with the CSM and MSFM modules installed."""

from ..weights.files import WeightsError
from .conditioning import GUIDANCE_CHANNELS, ConditioningSlot, MegaSRConditioning
from .config import MegaSRConfig, SeeSRConfig, load_model_config
from .csm import CSM, CSMAttnProcessor, install_csm
from .denoiser import MegaSRDenoiser, ParameterGroups, is_trainable_key
from .denoiser_io import is_megasr_key
from .msfm import MSFM, SAFT, ChannelAttention, DepthSegFusion, install_msfm
from .presets import PRESETS, Preset, get_preset
from .seesr import SeeSRDenoiser, install_image_attentions

__all__ = [
    "CSM",
    "CSMAttnProcessor",
    "ChannelAttention",
    "ConditioningSlot",
    "DepthSegFusion",
    "GUIDANCE_CHANNELS",
    "MSFM",
    "MegaSRConditioning",
    "MegaSRConfig",
    "MegaSRDenoiser",
    "PRESETS",
    "ParameterGroups",
    "Preset",
    "SAFT",
    "SeeSRConfig",
    "SeeSRDenoiser",
    "WeightsError",
    "get_preset",
    "install_image_attentions",
    "install_csm",
    "install_msfm",
    "is_megasr_key",
    "is_trainable_key",
    "load_model_config",
]
