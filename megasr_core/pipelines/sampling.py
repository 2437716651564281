"""The sampling maths of one MegaSR run, apart from the loop that drives it.

* **LRE start** (SeeSR's low-resolution-embedding start, REFERENCE.md): the run does not begin
  from pure noise but from the VAE latent of the bicubic-upscaled LR image, noised to
  ``start_timestep`` (999 by default): ``√ᾱ_t·z + √(1−ᾱ_t)·ε``.
* **Classifier-free guidance**: the model batch holds the negative-prompt half first and the
  positive half second; ``ε = ε_neg + s·(ε_pos − ε_neg)``.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def lre_start(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, start_timestep: int | None
) -> torch.Tensor:
    """Noise each image's latent to ``start_timestep`` (``None``: the schedule's first timestep).

    ``scheduler.set_timesteps`` must have run.
    """
    start = scheduler.timesteps[:1] if start_timestep is None else torch.tensor([start_timestep], device=latents.device)
    return scheduler.add_noise(latents, noise, start.repeat(latents.shape[0]))


def guidance_batch(inputs: torch.Tensor, do_cfg: bool) -> torch.Tensor:
    """The model batch for ``inputs``: twice over with CFG (negative half, positive half)."""
    return torch.cat([inputs, inputs]) if do_cfg else inputs


def classifier_free_guidance(prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Combine the [negative; positive] halves of a model batch: ε_neg + s·(ε_pos − ε_neg)."""
    negative, positive = prediction.chunk(2)
    return negative + guidance_scale * (positive - negative)
