"""The samplers: DDPM on the device gives diffusers' DDPM step bit for bit, and the opt-in solvers
and the CFG interval do what they promise (through the whole pipeline on the tiny weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from megasr_core.models.presets import SD2_SCHEDULER
from megasr_core.parameters import cfg_interval_problem, cfg_on_step, default_steps, sampler_problem
from megasr_core.pipelines import samplers
from megasr_core.pipelines.samplers import DeviceDDPM, DiffusersStep, StepNoise, make_sampler
from megasr_core.weights.layout import TURBO_SCHEDULER

SHAPE = (3, 4, 8, 8)


def generators(seeds=(1, 2, 3)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(
    "config",
    [
        SD2_SCHEDULER,
        {**SD2_SCHEDULER, **TURBO_SCHEDULER},
        {**SD2_SCHEDULER, "prediction_type": "v_prediction", "clip_sample": True},
        {**SD2_SCHEDULER, "variance_type": "fixed_large"},
    ],
    ids=["sd2", "turbo", "v-prediction-clipped", "fixed-large"],
)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_device_ddpm_is_diffusers_ddpm_bit_for_bit(config, steps):
    reference, ours = DDPMScheduler(**config), DDPMScheduler(**config)
    reference.set_timesteps(steps)
    sampler = DeviceDDPM(ours, steps, generators(), SHAPE, torch.float32, torch.device("cpu"))
    assert torch.equal(sampler.timesteps, reference.timesteps)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    expected, got = start.clone(), start.clone()
    theirs = generators()
    for index, t in enumerate(reference.timesteps):
        eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + index))
        expected = reference.step(eps, t, expected, generator=theirs).prev_sample
        got = sampler.step(index, eps, got)
        assert torch.equal(got, expected), f"step {index} (t={int(t)}) differs"


def test_noise_drawn_ahead_in_chunks_is_the_noise_drawn_step_by_step():
    steps = list(range(6))
    whole = StepNoise(generators(), SHAPE, torch.float32, torch.device("cpu"), steps)
    per_step = StepNoise(generators(), SHAPE, torch.float32, torch.device("cpu"), steps, budget_bytes=1)
    assert per_step.chunk == 1 and whole.chunk >= 6
    for index in steps:
        assert torch.equal(whole.take(index), per_step.take(index))
    with pytest.raises(KeyError):
        whole.take(0)  # used


def test_a_dropped_row_leaves_the_others_noise_as_it_was():
    steps = list(range(4))
    full = StepNoise(generators(), SHAPE, torch.float32, torch.device("cpu"), steps, budget_bytes=1)
    dropping = StepNoise(generators(), SHAPE, torch.float32, torch.device("cpu"), steps, budget_bytes=1)
    for index in steps:
        if index == 2:
            dropping.keep_rows([0, 2])
        expected = full.take(index)
        got = dropping.take(index)
        assert torch.equal(got, expected[[0, 2]] if index >= 2 else expected)


def test_a_shared_generator_is_drawn_in_diffusers_order():
    """One generator for every image: step by step, image by image, as diffusers draws it."""
    shared = torch.Generator().manual_seed(5)
    noise = StepNoise([shared] * 3, SHAPE, torch.float32, torch.device("cpu"), [0, 1])
    replay = torch.Generator().manual_seed(5)
    for index in (0, 1):
        expected = torch.cat([torch.randn((1, *SHAPE[1:]), generator=replay) for _ in range(3)])
        assert torch.equal(noise.take(index), expected)


def run_pipeline(pipeline, image, **kwargs):
    params = dict(scale=4, num_inference_steps=4, seed=[3, 4], prompt="a cat", guidance_scale=5.5) | kwargs
    return pipeline([image, image.rotate(90)], **params)


def pixels(image) -> bytes:
    return image.tobytes()


def test_the_pipeline_gives_the_same_images_as_with_diffusers_step(pipeline, small_cat, monkeypatch):
    ours = run_pipeline(pipeline, small_cat)
    monkeypatch.setattr(samplers, "device_ddpm_supported", lambda scheduler: False)
    theirs = run_pipeline(pipeline, small_cat)
    assert [pixels(i) for i in ours.images] == [pixels(i) for i in theirs.images]


def test_dropping_an_image_mid_run_leaves_the_other_as_with_diffusers_step(pipeline, small_cat, monkeypatch):
    def drop_second(calls: list[int]):
        def is_cancelled(index: int) -> bool:
            calls.append(index)
            return index == 1 and len(calls) > 4  # after two steps

        return is_cancelled

    ours = run_pipeline(pipeline, small_cat, is_cancelled=drop_second([]))
    monkeypatch.setattr(samplers, "device_ddpm_supported", lambda scheduler: False)
    theirs = run_pipeline(pipeline, small_cat, is_cancelled=drop_second([]))
    assert ours.cancelled == theirs.cancelled == [1]
    assert pixels(ours.images[0]) == pixels(theirs.images[0])
    assert ours.images[1] is None


def test_progress_reports_every_step_once_in_order(pipeline, small_cat):
    seen: list[tuple[int, int]] = []
    run_pipeline(pipeline, small_cat, callback=lambda step, total: seen.append((step, total)))
    assert seen == [(step, 4) for step in range(1, 5)]


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc"])
def test_a_fast_solver_runs_its_own_default_steps_from_t_999(pipeline, small_cat, name, monkeypatch):
    made: list = []
    original = samplers.make_sampler

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr("megasr_core.pipelines.pipeline_megasr.make_sampler", recording)
    steps: list[int] = []
    out = pipeline(small_cat, scale=4, seed=1, sampler=name, callback=lambda step, total: steps.append(total))
    assert out.images[0].size == (small_cat.width * 4, small_cat.height * 4)
    assert set(steps) == {default_steps(name, 50)} and len(steps) == default_steps(name, 50)
    assert isinstance(made[0], DiffusersStep) and made[0].name == name
    assert int(made[0].timesteps[0]) == 999  # trailing: the schedule starts where the LRE start puts the latent
    ddpm = pipeline(small_cat, scale=4, seed=1, num_inference_steps=default_steps(name, 50))
    assert pixels(out.images[0]) != pixels(ddpm.images[0])


def test_a_solver_drops_a_cancelled_row_from_its_history(pipeline, small_cat):
    calls: list[int] = []

    def is_cancelled(index: int) -> bool:
        calls.append(index)
        return index == 0 and len(calls) > 6  # after three steps: the solver has a history by then

    out = run_pipeline(pipeline, small_cat, sampler="dpmpp-2m", num_inference_steps=5, is_cancelled=is_cancelled)
    alone = pipeline(
        [small_cat.rotate(90)],
        scale=4,
        num_inference_steps=5,
        seed=[4],
        prompt="a cat",
        guidance_scale=5.5,
        sampler="dpmpp-2m",
    )
    assert out.cancelled == [0]
    # Batched and solo model maths differ in the last bits; a history row of the wrong image would not.
    difference = np.abs(np.asarray(out.images[1], dtype=int) - np.asarray(alone.images[0], dtype=int))
    assert difference.max() <= 2


def test_cfg_interval_runs_guidance_only_on_its_steps(pipeline, small_cat):
    batches: list[int] = []
    handle = pipeline.denoiser.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        pipeline(small_cat, scale=4, num_inference_steps=4, seed=1, guidance_scale=5.5, cfg_interval=(0.0, 0.5))
    finally:
        handle.remove()
    assert batches == [2, 2, 1, 1]  # CFG on steps 0 and 1 (positions 0 and 0.25), the positive half alone after


def test_a_full_cfg_interval_is_the_default_output(pipeline, small_cat):
    default = pipeline(small_cat, scale=4, num_inference_steps=3, seed=1)
    full = pipeline(small_cat, scale=4, num_inference_steps=3, seed=1, cfg_interval=(0, 1))
    part = pipeline(small_cat, scale=4, num_inference_steps=3, seed=1, cfg_interval=(0, 0.5))
    assert pixels(default.images[0]) == pixels(full.images[0]) != pixels(part.images[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "euler"}, "sampler must be one of ddpm, dpmpp-2m, unipc"),
        ({"cfg_interval": (0.5, 0.5)}, "cfg_interval must be two fractions"),
        ({"cfg_interval": (0, 2)}, "cfg_interval must be two fractions"),
    ],
)
def test_bad_sampler_options_are_refused(pipeline, small_cat, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline(small_cat, **kwargs)


def test_the_parameter_rules():
    assert sampler_problem("ddpm") is None and sampler_problem("DDPM") is not None
    assert default_steps("ddpm", 50) == 50 and default_steps("ddpm", 2) == 2
    assert default_steps("dpmpp-2m", 50) == 25 and default_steps("unipc", 50) == 20
    assert cfg_interval_problem(None) is None and cfg_interval_problem([0, 0.6]) is None
    for bad in ((0.6, 0.2), (-0.1, 0.5), (0, 1.5), (0,), "0,1", (True, 1), (0, float("nan"))):
        assert cfg_interval_problem(bad) is not None, bad
    assert [cfg_on_step((0, 0.5), i, 4) for i in range(4)] == [True, True, False, False]
    assert [cfg_on_step((0.25, 1), i, 4) for i in range(4)] == [False, True, True, True]
    assert all(cfg_on_step(None, i, 4) for i in range(4))


def test_make_sampler_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="sampler must be one of"):
        base = DDPMScheduler(**SD2_SCHEDULER)
        make_sampler("euler", base, 4, generators(), SHAPE, torch.float32, torch.device("cpu"))
