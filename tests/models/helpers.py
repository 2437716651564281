"""Helpers for the model tests: tiny denoisers, seeded inputs, perturbing zero-init weights."""

from __future__ import annotations

import copy

import torch

from megasr_core.models import MegaSRDenoiser, get_preset

TINY = get_preset("tiny")


def build_denoiser(tiny_base, **changes) -> MegaSRDenoiser:
    unet, controlnet = tiny_base
    config = TINY.megasr.replace(**changes)
    return MegaSRDenoiser(copy.deepcopy(unet), copy.deepcopy(controlnet), config).eval()


def make_inputs(seed: int = 0, batch: int = 2, latent: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = latent * 8
    cfg = TINY.megasr
    return {
        "latents": torch.randn(batch, 4, latent, latent, generator=g),
        "timestep": torch.tensor([981, 501][:batch] + [1] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 77, TINY.unet["cross_attention_dim"], generator=g),
        "image_embeds": torch.randn(batch, cfg.num_image_tokens, cfg.image_embed_dim, generator=g),
        "guidance": {
            "hed": torch.rand(batch, 1, size, size, generator=g),
            "depth": torch.rand(batch, 1, size, size, generator=g),
            "seg": torch.rand(batch, 3, size, size, generator=g),
        },
        "control_image": torch.rand(batch, 3, size, size, generator=g),
    }


def perturb_zero_init(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> int:
    """Give every zero-initialized MegaSR parameter random values; returns how many tensors."""
    g = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            if ("csm" in parts and "proj" in parts) or ("msfm" in parts and ("gamma" in parts or "beta" in parts)):
                param.copy_(torch.randn(param.shape, generator=g) * std)
                touched += 1
    return touched


def assert_same_outputs(loaded: torch.nn.Module, original: torch.nn.Module, inputs: dict) -> None:
    """``loaded`` (from files, with its state already checked equal) computes what ``original`` does.

    Equal to float rounding, not bitwise: loaded tensors are views into the file's buffer at 8-byte
    offsets, and some one-thread CPU kernels sum in another order on such unaligned data.
    """
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), original(**inputs), rtol=0, atol=1e-5)
