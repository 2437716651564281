"""Known answers for the sampling maths of MegaSRPipeline, recomputed independently in the test.

The pipeline runs on the tiny weights; hooks on its public components (``denoiser``, its
``unet``, the sampler's ``step``, ``scheduler.add_noise``, ``vae.encode``) record what flows
between them, and each test recomputes the expected value from the documented formula:
classifier-free guidance ε = ε_u + s·(ε_c − ε_u) with the batch [negative, positive], the
ControlNet residual scale, the LRE start √ᾱ_t·z + √(1−ᾱ_t)·ε, and the two colour fixes.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from megasr_core.pipelines import PipelineCancelled
from megasr_core.pipelines.color_fix import color_fix
from megasr_core.pipelines.samplers import DeviceDDPM

PROMPT, NEGATIVE, SCALE = "a red cat", "blurry, ugly", 4.0
STEPS, SEED = 2, 0
SUFFIX = "clean, high-resolution, 8k"


def first_ddpm_timestep(scheduler_config, num_inference_steps: int) -> int:
    """DDPM "leading" spacing with ``steps_offset``: (N−1)·(1000 // N) + 1 (981 for 50 steps, 501 for 2)."""
    assert scheduler_config.timestep_spacing == "leading"
    step = scheduler_config.num_train_timesteps // num_inference_steps
    return (num_inference_steps - 1) * step + scheduler_config.steps_offset


def lre_start_timestep(scheduler_config, num_inference_steps: int) -> int:
    """The timestep the LRE start noises the VAE latent to by default: t = 999, SeeSR's
    ``start_steps`` (REFERENCE.md, issue 11), whatever the number of steps."""
    return 999


def alphas_cumprod(scheduler_config) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) for SD2's "scaled_linear" betas, in float64."""
    assert scheduler_config.beta_schedule == "scaled_linear"
    n = scheduler_config.num_train_timesteps
    betas = (
        torch.linspace(scheduler_config.beta_start**0.5, scheduler_config.beta_end**0.5, n, dtype=torch.float64) ** 2
    )
    return torch.cumprod(1.0 - betas, dim=0)


def encode_prompt(pipeline, text: str) -> torch.Tensor:
    """Text tokens e_t of one prompt: padded to 77 tokens, the encoder's last hidden states."""
    ids = pipeline.tokenizer(
        [text],
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.inference_mode():
        return pipeline.text_encoder(ids).last_hidden_state[0]


@contextmanager
def recording(pipeline, stop_after_steps: int | None = None):
    """Record what passes between the pipeline's components; optionally cancel after N steps."""
    rec: dict[str, list] = {k: [] for k in ("denoiser_in", "eps", "unet_in", "noise_pred", "add_noise", "vae_in")}
    denoiser, scheduler, vae = pipeline.denoiser, pipeline.scheduler, pipeline.vae
    signature = inspect.signature(denoiser.forward)
    unet_signature = inspect.signature(denoiser.unet.forward)

    def on_denoiser_in(_module, args, kwargs):
        rec["denoiser_in"].append(dict(signature.bind(*args, **kwargs).arguments))

    def on_denoiser_out(_module, _args, _kwargs, output):
        rec["eps"].append(output.clone())

    def on_unet_in(_module, args, kwargs):
        rec["unet_in"].append(dict(unet_signature.bind(*args, **kwargs).arguments))

    original_step, original_add_noise, original_encode = DeviceDDPM.step, scheduler.add_noise, vae.encode

    def step(self, index, noise_pred, latents):
        rec["noise_pred"].append(noise_pred.clone())
        return original_step(self, index, noise_pred, latents)

    def add_noise(original, noise, timesteps):
        rec["add_noise"].append((original.clone(), noise.clone(), timesteps.clone()))
        return original_add_noise(original, noise, timesteps)

    def encode(x, *args, **kwargs):
        rec["vae_in"].append(x.clone())
        return original_encode(x, *args, **kwargs)

    handles = [
        denoiser.register_forward_pre_hook(on_denoiser_in, with_kwargs=True),
        denoiser.register_forward_hook(on_denoiser_out, with_kwargs=True),
        denoiser.unet.register_forward_pre_hook(on_unet_in, with_kwargs=True),
    ]
    DeviceDDPM.step, scheduler.add_noise, vae.encode = step, add_noise, encode
    rec["should_cancel"] = (lambda: len(rec["noise_pred"]) >= stop_after_steps) if stop_after_steps else None
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        DeviceDDPM.step = original_step
        del scheduler.add_noise, vae.encode


@pytest.fixture(scope="module")
def lr_image() -> Image.Image:
    """A 64×64 crop of a real photo: ×4 is 256×256, above the tiny model's 128-px working minimum,
    so it works at its output size, a 32×32 latent (4,096 latent values for the statistics below)."""
    return Image.fromarray(data.astronaut()[40:232, 150:342]).resize((64, 64), Image.Resampling.BICUBIC)


def run(pipeline, image, stop_after_steps=None, **kwargs):
    """One pipeline call with the shared settings, recorded; returns (output or None, record)."""
    params = (
        dict(
            scale=4,
            num_inference_steps=STEPS,
            guidance_scale=SCALE,
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            seed=SEED,
            color_fix="adain",
        )
        | kwargs
    )
    with recording(pipeline, stop_after_steps) as rec:
        try:
            out = pipeline(image, should_cancel=rec["should_cancel"], **params)
        except PipelineCancelled:
            out = None
    return out, rec


@pytest.fixture(scope="module")
def live(pipeline):
    """The tiny pipeline with its ControlNet zero-convs given random values, restored afterwards.

    The tiny weights keep the ControlNet's zero-convs at zero (the ControlNet recipe), so its
    residuals would all be exactly 0 and no ControlNet path could be checked.
    """
    prefixes = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    params = {n: p for n, p in pipeline.denoiser.controlnet.named_parameters() if n.startswith(prefixes)}
    saved = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in params.values():
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    try:
        yield pipeline
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])


@pytest.fixture(scope="module")
def cfg_run(live, lr_image):
    """The reference run's first step: CFG scale 4, user prompt and negative prompt, ControlNet scale 1."""
    _, rec = run(live, lr_image, stop_after_steps=1)
    assert len(rec["eps"]) == 1 and len(rec["noise_pred"]) == 1
    return rec


@pytest.fixture(scope="module")
def plain_run(live, lr_image):
    """A whole run without CFG (guidance scale 1), same seed and prompts as the reference run."""
    out, rec = run(live, lr_image, guidance_scale=1.0)
    assert len(rec["eps"]) == STEPS
    return out, rec


def lr_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


# ---------------------------------------------------------------- classifier-free guidance
def test_cfg_noise_prediction_is_uncond_plus_scale_times_difference(cfg_run):
    """ε = ε_u + s·(ε_c − ε_u), with the model batch ordered [negative prompt, positive prompt]."""
    eps, noise_pred = cfg_run["eps"][0], cfg_run["noise_pred"][0]
    assert eps.shape[0] == 2  # one image, doubled for CFG
    eps_u, eps_c = eps[:1], eps[1:]
    expected = eps_u + SCALE * (eps_c - eps_u)
    torch.testing.assert_close(noise_pred, expected, rtol=0, atol=1e-6)
    swapped = eps_c + SCALE * (eps_u - eps_c)
    assert (swapped - expected).abs().max() > 1e-2  # teeth: the halves really differ


def test_cfg_halves_are_negative_then_positive_prompt_on_the_same_inputs(live, cfg_run, plain_run):
    """CFG batch: e_t = [E(negative_prompt), E("{tags}, {prompt}, clean, high-resolution, 8k")], same z_t and
    control twice."""
    out, _ = plain_run
    positive = out.prompts[0]
    # The prompt string is checked as such: the tiny byte-level tokenizer keeps only the first 77
    # bytes, so with many tags the user prompt may not reach the embedding at all.
    assert positive.endswith(f", {PROMPT}, {SUFFIX}") or positive == f"{PROMPT}, {SUFFIX}"
    call = cfg_run["denoiser_in"][0]
    text = call["encoder_hidden_states"]
    torch.testing.assert_close(text[0], encode_prompt(live, NEGATIVE), rtol=0, atol=1e-6)
    torch.testing.assert_close(text[1], encode_prompt(live, positive), rtol=0, atol=1e-6)
    assert (encode_prompt(live, NEGATIVE) - encode_prompt(live, positive)).abs().max() > 1e-2
    latents, control = call["latents"], call["control_image"]
    assert torch.equal(latents[0], latents[1]) and torch.equal(control[0], control[1])


def test_guidance_scale_one_runs_the_positive_prompt_alone(live, cfg_run, plain_run):
    """s = 1: no CFG doubling; ε = ε_c(E(positive)), the same ε_c as the s = 4 run's second half."""
    out, rec = plain_run
    for call, eps, noise_pred in zip(rec["denoiser_in"], rec["eps"], rec["noise_pred"]):
        assert call["latents"].shape[0] == 1 and call["encoder_hidden_states"].shape[0] == 1
        torch.testing.assert_close(
            call["encoder_hidden_states"][0], encode_prompt(live, out.prompts[0]), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(noise_pred, eps, rtol=0, atol=0)
    # Same seed ⇒ same start latents; the unguided prediction is the guided run's conditional half.
    first, guided = rec["denoiser_in"][0], cfg_run["denoiser_in"][0]
    torch.testing.assert_close(first["latents"][0], guided["latents"][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(rec["eps"][0][0], cfg_run["eps"][0][1], rtol=0, atol=1e-4)
    assert (rec["noise_pred"][0] - cfg_run["noise_pred"][0]).abs().max() > 1e-2  # the scale changes ε


def test_controlnet_residuals_reaching_the_unet_scale_with_controlnet_scale(live, lr_image, plain_run):
    """UNet residuals at ControlNet scale c = c × those at scale 1 (same inputs at the first step)."""
    c = 0.5
    _, rec = run(live, lr_image, stop_after_steps=1, guidance_scale=1.0, controlnet_scale=c)
    full, scaled = plain_run[1]["unet_in"][0], rec["unet_in"][0]
    torch.testing.assert_close(scaled["sample"], full["sample"], rtol=0, atol=0)
    pairs = list(zip(scaled["down_block_additional_residuals"], full["down_block_additional_residuals"]))
    pairs.append((scaled["mid_block_additional_residual"], full["mid_block_additional_residual"]))
    assert len(pairs) == len(live.denoiser.controlnet.controlnet_down_blocks) + 1
    for got, reference in pairs:
        assert reference.abs().max() > 1e-3  # the full-scale residuals are not zero
        torch.testing.assert_close(got, c * reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- LRE start
def test_lre_start_is_the_noised_vae_latent_of_the_bicubic_lr(live, lr_image, cfg_run):
    """z_T = √ᾱ_t·z + √(1−ᾱ_t)·ε, z = VAE sample of bicubic×4(LR)·0.18215, t = the documented LRE start."""
    config = live.scheduler.config
    # The image the VAE encodes: bicubic ×4 of the LR (256², no padding needed), mapped to [-1, 1].
    upscaled = F.interpolate(lr_tensor(lr_image), size=(256, 256), mode="bicubic", align_corners=False).clamp(0, 1)
    assert len(cfg_run["vae_in"]) == 1
    torch.testing.assert_close(cfg_run["vae_in"][0], upscaled * 2 - 1, rtol=0, atol=1e-5)
    # z is a sample of that posterior times the VAE's scaling factor: its standardized draw is N(0, 1).
    with torch.inference_mode():
        posterior = live.vae.encode(upscaled * 2 - 1).latent_dist
    ((z, eps, _),) = cfg_run["add_noise"]
    draw = (z / live.vae.config.scaling_factor - posterior.mean) / posterior.std
    assert abs(draw.mean().item()) < 0.05 and abs(draw.std().item() - 1) < 0.05
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([draw.flatten(), eps.flatten()]))[0, 1].item()) < 0.05
    # The first model input is that latent noised to the documented start timestep.
    abar = alphas_cumprod(config)
    t = lre_start_timestep(config, STEPS)
    expected = math.sqrt(abar[t]) * z.double() + math.sqrt(1 - abar[t]) * eps.double()
    for half in cfg_run["denoiser_in"][0]["latents"]:
        torch.testing.assert_close(half.double(), expected[0], rtol=0, atol=1e-5)
    # Teeth: another timestep (here the schedule's first, 501) gives a clearly different start.
    first = first_ddpm_timestep(config, STEPS)
    other = math.sqrt(abar[first]) * z.double() + math.sqrt(1 - abar[first]) * eps.double()
    assert (other - expected).abs().max() > 1e-2


def test_lre_start_none_noises_to_the_first_ddpm_timestep(live, lr_image):
    """``start_timestep=None``: z_T = √ᾱ_t·z + √(1−ᾱ_t)·ε at the schedule's first timestep (the old behaviour)."""
    _, rec = run(live, lr_image, stop_after_steps=1, start_timestep=None)
    abar = alphas_cumprod(live.scheduler.config)
    t = first_ddpm_timestep(live.scheduler.config, STEPS)
    ((z, eps, timesteps),) = rec["add_noise"]
    assert timesteps.tolist() == [t]
    expected = math.sqrt(abar[t]) * z.double() + math.sqrt(1 - abar[t]) * eps.double()
    for half in rec["denoiser_in"][0]["latents"]:
        torch.testing.assert_close(half.double(), expected[0], rtol=0, atol=1e-5)
    assert int(rec["denoiser_in"][0]["timestep"]) == t


@pytest.mark.parametrize("value", [1000, -1, 2.5, True, 500])
def test_lre_start_timestep_is_checked(pipeline, lr_image, value):
    """Integers 0..999 only, and not below the first of the scheduler's timesteps (501 for 2 steps)."""
    with pytest.raises(ValueError, match="start_timestep"):
        pipeline(lr_image, num_inference_steps=STEPS, start_timestep=value, seed=0)


def test_first_denoising_step_runs_at_the_first_ddpm_timestep(live, cfg_run):
    """DDPM "leading" spacing: t_0 = (N−1)·(1000 // N) + 1 (981 for N = 50, 501 for N = 2), whatever the LRE start."""
    config = live.scheduler.config
    expected = (STEPS - 1) * (config.num_train_timesteps // STEPS) + config.steps_offset
    assert int(cfg_run["denoiser_in"][0]["timestep"]) == expected
    assert lre_start_timestep(config, STEPS) != expected  # the start noise level and the first step differ


def test_ddpm_alphas_cumprod_matches_the_schedule_formula(pipeline):
    """ᾱ from SD2's scaled_linear betas (0.00085 → 0.012, 1000 steps), recomputed in float64."""
    ours = alphas_cumprod(pipeline.scheduler.config)
    torch.testing.assert_close(pipeline.scheduler.alphas_cumprod.double(), ours, rtol=1e-5, atol=1e-7)
    assert ours[0].item() == pytest.approx(1 - 0.00085) and ours[-1].item() == pytest.approx(0.0047, abs=1e-4)


# ---------------------------------------------------------------- colour fix
def small_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A content image with a colour cast and a reference, 2×3×20×24, values well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    content = 0.45 + 0.15 * torch.rand(2, 3, 20, 24, generator=g) + torch.tensor([0.1, -0.05, 0.0])[None, :, None, None]
    reference = 0.5 + 0.08 * torch.randn(2, 3, 20, 24, generator=g).clamp(-2, 2)
    return content, reference


def test_adain_matches_each_channel_to_the_reference_mean_and_std():
    """AdaIN: (x − μ_x)/σ_x · σ_ref + μ_ref per image and channel (population σ)."""
    content, reference = small_pair()
    out = color_fix(content, reference, "adain")
    for b in range(2):
        for c in range(3):
            x, r = content[b, c].double(), reference[b, c].double()
            mu_x, sd_x = x.mean(), ((x - x.mean()) ** 2).mean().sqrt()
            mu_r, sd_r = r.mean(), ((r - r.mean()) ** 2).mean().sqrt()
            expected = ((x - mu_x) / sd_x * sd_r + mu_r).clamp(0, 1)
            torch.testing.assert_close(out[b, c].double(), expected, rtol=0, atol=1e-4)
            assert out[b, c].mean().item() == pytest.approx(mu_r.item(), abs=1e-5)
            assert out[b, c].std(unbiased=False).item() == pytest.approx(sd_r.item(), rel=1e-3)


def blur_reference(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """[1 2 1]ᵀ[1 2 1]/16 at taps ±dilation, edges replicated, written as a sum of shifted copies."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    for dy, wy in ((-dilation, 1), (0, 2), (dilation, 1)):
        rows = (torch.arange(h) + dy).clamp(0, h - 1)
        for dx, wx in ((-dilation, 1), (0, 2), (dilation, 1)):
            cols = (torch.arange(w) + dx).clamp(0, w - 1)
            out += wy * wx / 16.0 * image[..., rows[:, None], cols[None, :]]
    return out


def low_pass_reference(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    for level in range(levels):
        image = blur_reference(image, 2**level)
    return image


def test_wavelet_fix_keeps_output_high_and_reference_low_frequencies():
    """Wavelet fix: x − L(x) + L(ref), L = 5 levels of the à-trous 3×3 blur (dilations 1, 2, 4, 8, 16)."""
    content, reference = small_pair(seed=1)
    out = color_fix(content, reference, "wavelet")
    expected = (content.double() - low_pass_reference(content.double()) + low_pass_reference(reference.double())).clamp(
        0, 1
    )
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    # Teeth: the result is neither input, and fewer levels give another answer.
    fewer = content.double() - low_pass_reference(content.double(), 4) + low_pass_reference(reference.double(), 4)
    assert (fewer.clamp(0, 1) - expected).abs().max() > 1e-3
    assert (out - content).abs().max() > 1e-2 and (out - reference).abs().max() > 1e-2


def test_lre_start_and_guidance_called_directly_match_their_formulas(live):
    """The two functions of pipelines/sampling.py on their own, for a batch of three: the LRE start at t = 999
    and at the schedule's first timestep (None), and CFG's ε_neg + s·(ε_pos − ε_neg) on [negative; positive]."""
    from diffusers import DDPMScheduler

    from megasr_core.pipelines.sampling import classifier_free_guidance, guidance_batch, lre_start

    scheduler = DDPMScheduler.from_config(live.scheduler.config)
    scheduler.set_timesteps(STEPS)
    abar = alphas_cumprod(live.scheduler.config)
    generator = torch.Generator().manual_seed(5)
    z, eps = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    for start, t in ((999, 999), (None, first_ddpm_timestep(live.scheduler.config, STEPS))):
        expected = math.sqrt(abar[t]) * z.double() + math.sqrt(1 - abar[t]) * eps.double()
        torch.testing.assert_close(lre_start(scheduler, z, eps, start).double(), expected, rtol=0, atol=1e-5)
    negative, positive = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    torch.testing.assert_close(
        classifier_free_guidance(torch.cat([negative, positive]), 7.5), negative + 7.5 * (positive - negative)
    )
    assert torch.equal(guidance_batch(z, True), torch.cat([z, z])) and guidance_batch(z, False) is z
