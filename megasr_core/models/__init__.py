"""MegaSR networks: the SD2 UNet + ControlNet with the CSM and MSFM modules installed."""

from .conditioning import GUIDANCE_CHANNELS, ConditioningSlot, MegaSRConditioning
from .config import MegaSRConfig
from .csm import CSM, CSMAttnProcessor, install_csm
from .denoiser import MegaSRDenoiser, ParameterGroups, is_megasr_key, is_trainable_key
from .msfm import MSFM, SAFT, ChannelAttention, DepthSegFusion, install_msfm
from .presets import PRESETS, Preset, get_preset
from .state_dicts import WeightsError

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
    "WeightsError",
    "get_preset",
    "install_csm",
    "install_msfm",
    "is_megasr_key",
    "is_trainable_key",
]
