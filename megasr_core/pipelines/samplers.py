"""The samplers of the denoising loop: the paper's DDPM, run without host syncs, and opt-in fast solvers.

``ddpm`` (the default, the paper's and SeeSR's sampler) is diffusers' ``DDPMScheduler.step``
with everything that made it wait for the GPU taken out of the loop:

* its per-step coefficients (ᾱ_t, ᾱ_prev and what follows from them) are computed once per run,
  with the same float32 operations in the same order, and sit on the device in the sample's
  dtype, which is the precision diffusers' 0-d coefficient tensors are rounded to when they
  meet a half-precision sample there; its ``nonzero`` timestep lookup and ``t > 0`` test on a
  device tensor become a host-side step index;
* the ancestral noise of every step is drawn ahead from the same per-image CPU generators, in
  diffusers' order (step by step, image by image, in the model output's dtype), and reaches
  the device by a non-blocking copy from pinned memory instead of a blocking ``.to(device)``.

So a run gives bit-identical latents to diffusers' step on the CPU (the tests check it) and
the same operations on the same dtypes on a GPU (the GPU suite checks it). Configs it does not
cover (thresholding, learned variances) fall back to diffusers' own step.

``dpmpp-2m`` (DPM-Solver++ 2M) and ``unipc`` are diffusers' multistep solvers, built from the
model's DDPM config with trailing timesteps (the schedule starts at t = 999, where the LRE start
puts the latent). They need fewer steps (defaults in ``megasr_core.parameters``) and change the
output: measure them with ``megasr eval`` on real weights before relying on them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ..parameters import DDPM, DPMPP_2M, SAMPLERS, UNIPC

#: pre-drawn noise held at once (bytes); larger runs draw it in chunks of steps
NOISE_BUDGET_BYTES = 256 * 2**20
#: DDPM configs the device step reproduces exactly; others use diffusers' step
_DEVICE_VARIANCES = ("fixed_small", "fixed_large")
_DEVICE_PREDICTIONS = ("epsilon", "v_prediction", "sample")
#: the multistep solvers' state that holds one row per image
_SOLVER_BATCH_STATE = ("model_outputs", "last_sample", "sample")


class Sampler(Protocol):
    """What the pipeline's loop drives: a schedule and one update per step."""

    name: str
    timesteps: torch.Tensor  # on the device, one per step

    def step(self, index: int, noise_pred: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The latents after step ``index`` (0-based) of the schedule."""
        ...

    def keep_rows(self, rows: list[int]) -> None:
        """Only these rows (images) of the batch go on."""
        ...


def make_sampler(
    name: str,
    base: DDPMScheduler,
    steps: int,
    generators: list[torch.Generator],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Sampler:
    """The sampler ``name`` for one batch of latents of ``shape`` (``base``: the model's DDPM scheduler).

    ``generators`` are the images' CPU generators, one per row; only DDPM draws from them.
    """
    if name == DDPM:
        if device_ddpm_supported(base):
            return DeviceDDPM(base, steps, generators, shape, dtype, device)
        return DiffusersStep(base, steps, device, generators)
    return DiffusersStep(solver_scheduler(name, base), steps, device, None, name=name)


def solver_scheduler(name: str, base: DDPMScheduler):
    """A fresh diffusers scheduler of the solver ``name``, from the model's DDPM config, with trailing
    timesteps (``ValueError`` for a name that is no solver)."""
    if name == DPMPP_2M:
        return DPMSolverMultistepScheduler.from_config(
            base.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    if name == UNIPC:
        return UniPCMultistepScheduler.from_config(base.config, timestep_spacing="trailing")
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def first_timestep(name: str, base: DDPMScheduler, steps: int) -> int:
    """The first timestep of ``name``'s schedule of ``steps`` (the LRE start may not be below it)."""
    schedule = DDPMScheduler.from_config(base.config) if name == DDPM else solver_scheduler(name, base)
    schedule.set_timesteps(steps)
    return int(schedule.timesteps[0])


def device_ddpm_supported(scheduler: DDPMScheduler) -> bool:
    """Whether :class:`DeviceDDPM` reproduces this scheduler's step."""
    config = scheduler.config
    return (
        isinstance(scheduler, DDPMScheduler)
        and not config.thresholding
        and config.variance_type in _DEVICE_VARIANCES
        and config.prediction_type in _DEVICE_PREDICTIONS
    )


def ddpm_coefficients(scheduler: DDPMScheduler, timesteps: list[int]) -> tuple[torch.Tensor, list[bool]]:
    """Per step: (√ᾱ_t, √(1−ᾱ_t), x₀ coefficient, x_t coefficient, noise std) as a float32 CPU
    table, and whether the step adds noise (t > 0).

    The arithmetic is ``DDPMScheduler.step``'s and ``_get_variance``'s, op for op on float32
    0-d tensors, so every value is the one diffusers computes.
    """
    alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    one = torch.tensor(1.0)
    rows, noisy = [], []
    for index, t in enumerate(timesteps):
        prev_t = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        alpha_prod_t = alphas_cumprod[t]
        alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        if scheduler.config.variance_type == "fixed_large":
            variance = 1 - alpha_prod_t / alpha_prod_t_prev
        else:
            variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
            variance = torch.clamp(variance, min=1e-20)
        rows.append(torch.stack([alpha_prod_t**0.5, beta_prod_t ** (0.5), x0_coeff, xt_coeff, variance**0.5]))
        noisy.append(t > 0)
    return torch.stack(rows), noisy


class StepNoise:
    """The ancestral noise of a run's noisy steps, drawn ahead in diffusers' order.

    diffusers draws, at each noisy step, one ``(1, …)`` tensor per image from that image's
    generator, in the model output's dtype on the CPU. Drawing the same tensors for several
    steps at once (step by step, image by image) takes the same numbers from every generator;
    they go to the device in one non-blocking copy per chunk of steps. Rows of images that
    leave the batch are dropped, and their generators are not drawn from again.
    """

    def __init__(
        self,
        generators: list[torch.Generator],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        steps: list[int],
        budget_bytes: int = NOISE_BUDGET_BYTES,
    ) -> None:
        self.generators = list(generators)
        self.row_shape = (1, *shape[1:])
        self.dtype, self.device = dtype, torch.device(device)
        self.pending = list(steps)  # noisy steps not drawn yet, in order
        per_step = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.chunk = max(1, budget_bytes // max(per_step, 1))
        self.ready: dict[int, torch.Tensor] = {}

    def take(self, index: int) -> torch.Tensor:
        """The noise of step ``index`` (drawing the next chunk of steps when it is not ready)."""
        if index not in self.ready:
            self._draw_chunk(index)
        return self.ready.pop(index)

    def keep_rows(self, rows: list[int]) -> None:
        self.generators = [self.generators[r] for r in rows]
        index = torch.tensor(rows, device=self.device)
        self.ready = {step: noise[index] for step, noise in self.ready.items()}

    def _draw_chunk(self, index: int) -> None:
        if index not in self.pending:
            raise KeyError(f"step {index} adds no noise, or its noise was already used")
        start = self.pending.index(index)
        chunk, self.pending = self.pending[start : start + self.chunk], self.pending[start + self.chunk :]
        pin = self.device.type == "cuda"
        drawn = torch.empty((len(chunk), len(self.generators), *self.row_shape[1:]), dtype=self.dtype, pin_memory=pin)
        for position in range(len(chunk)):
            for row, generator in enumerate(self.generators):
                drawn[position, row] = torch.randn(self.row_shape, generator=generator, dtype=self.dtype)[0]
        on_device = drawn.to(self.device, non_blocking=pin)
        self.ready.update({step: on_device[position] for position, step in enumerate(chunk)})


class DeviceDDPM:
    """DDPM ancestral sampling (diffusers' ``DDPMScheduler.step``) with no host sync per step."""

    name = DDPM

    def __init__(
        self,
        scheduler: DDPMScheduler,
        steps: int,
        generators: list[torch.Generator],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        scheduler.set_timesteps(steps, device=device)
        self.timesteps = scheduler.timesteps
        table, self.noisy = ddpm_coefficients(scheduler, [int(t) for t in scheduler.timesteps.cpu()])
        # One row per step, in the sample's dtype: the precision diffusers' device-side 0-d
        # coefficients take when they meet a sample of that dtype.
        self.table = table.to(device=device, dtype=dtype)
        self.prediction_type = scheduler.config.prediction_type
        self.clip_range = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
        self.noise = StepNoise(generators, shape, dtype, device, [i for i, n in enumerate(self.noisy) if n])

    def step(self, index: int, noise_pred: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.update(*self.step_inputs(index), noise_pred, latents)

    def step_inputs(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What step ``index`` reads besides the prediction and the latents: its row of coefficients
        and its noise (None for a step without), both on the device."""
        return self.table[index], (self.noise.take(index) if self.noisy[index] else None)

    def update(
        self, coefficients: torch.Tensor, noise: torch.Tensor | None, noise_pred: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """One DDPM step from a row of coefficients: tensor operations only, so a CUDA graph can
        capture it with the row and the noise in static buffers (``DenoiserGraphs.step``)."""
        sqrt_alpha, sqrt_beta, x0_coeff, xt_coeff, std = coefficients.unbind()
        if self.prediction_type == "epsilon":
            x0 = (latents - sqrt_beta * noise_pred) / sqrt_alpha
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_alpha * latents - sqrt_beta * noise_pred
        else:
            x0 = noise_pred
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        previous = x0_coeff * x0 + xt_coeff * latents
        if noise is not None:
            previous = previous + std * noise
        return previous

    @property
    def update_key(self) -> tuple:
        """What distinguishes this sampler's update maths (a graph of it is kept per key)."""
        return (self.prediction_type, self.clip_range)

    def keep_rows(self, rows: list[int]) -> None:
        self.noise.keep_rows(rows)


class DiffusersStep:
    """A diffusers scheduler's own ``step`` (the multistep solvers; DDPM configs the device step
    does not cover), with per-image generators where it draws noise."""

    def __init__(
        self,
        scheduler,
        steps: int,
        device: torch.device,
        generators: list[torch.Generator] | None,
        name: str = DDPM,
    ) -> None:
        scheduler.set_timesteps(steps, device=device)
        self.scheduler, self.name = scheduler, name
        self.timesteps = scheduler.timesteps
        self.generators = generators

    def step(self, index: int, noise_pred: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[index]
        if self.generators is None:
            return self.scheduler.step(noise_pred, t, latents).prev_sample
        return self.scheduler.step(noise_pred, t, latents, generator=self.generators).prev_sample

    def keep_rows(self, rows: list[int]) -> None:
        if self.generators is not None:
            self.generators = [self.generators[r] for r in rows]
        for name in _SOLVER_BATCH_STATE:
            value = getattr(self.scheduler, name, None)
            if torch.is_tensor(value):
                setattr(self.scheduler, name, value[rows])
            elif isinstance(value, list):
                setattr(self.scheduler, name, [v[rows] if torch.is_tensor(v) else v for v in value])
