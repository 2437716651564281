"""One sampler, three families: SeeSR's prompt, RAM tokens, Turbo's two steps, tiling, batching, graphs, compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megasr_core.families import FAMILIES, get_family
from megasr_core.pipelines import DEFAULT_NEGATIVE_PROMPT, PipelineCancelled, load_image
from megasr_core.pipelines.acceleration import compile_pipeline, uncompile_pipeline
from megasr_core.pipelines.denoiser_graphs import DenoiserGraphs


def record_calls(pipeline, monkeypatch) -> list[dict]:
    """Every denoiser forward of a run, its arguments kept (the real forward still runs)."""
    calls: list[dict] = []
    forward = pipeline.denoiser.forward

    def recording(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipeline.denoiser, "forward", recording)
    return calls


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_seesr_prompts_with_its_exact_string_and_conditions_both_halves_on_rams_embeddings(
    seesr_pipelines, small_cat, monkeypatch
):
    pipeline = seesr_pipelines["seesr"]
    calls = record_calls(pipeline, monkeypatch)
    out = pipeline(small_cat, prompt="a tabby cat", seed=0, num_inference_steps=2)
    tags, embeds = pipeline.extractors.tagger.tags_and_embeds(load_image(small_cat).rgb[None])
    assert tags[0], "the tiny RAM should tag the photo"
    assert out.prompts == [
        f"{', '.join(tags[0])}, a tabby cat,clean, high-resolution, 8k"
    ]  # f"{tags}, {prompt}," + suffix

    first = calls[0]
    latents, timestep, text = first["args"][:3]
    assert latents.shape[0] == 2 and int(timestep) == 501  # [negative; positive] halves; SD2's leading 2-step schedule
    conditioning = first["conditioning"]
    assert conditioning.repeat == 2 and conditioning.hed is None and conditioning.depth_seg is None
    for half in conditioning.image_tokens:
        torch.testing.assert_close(half, embeds[0], rtol=0, atol=0)  # RAM in float32, as SeeSR runs it
    torch.testing.assert_close(text[0], pipeline._encode_text([DEFAULT_NEGATIVE_PROMPT])[0])
    torch.testing.assert_close(text[1], pipeline._encode_text(out.prompts)[0])
    assert [int(call["args"][1]) for call in calls] == [501, 1]


def test_turbo_runs_two_trailing_steps_without_guidance(seesr_pipelines, small_cat, monkeypatch):
    pipeline = seesr_pipelines["seesr-turbo"]
    calls = record_calls(pipeline, monkeypatch)
    progress = []
    out = pipeline(small_cat, seed=0, callback=lambda step, total: progress.append((step, total)))
    assert [int(call["args"][1]) for call in calls] == [999, 499]
    assert all(call["args"][0].shape[0] == 1 and call["conditioning"].repeat == 1 for call in calls)  # one half: CFG 1
    assert progress == [(1, 2), (2, 2)]
    assert out.images[0].size == (small_cat.width * 4, small_cat.height * 4)
    # asked for guidance, Turbo runs both halves like any other model
    calls.clear()
    pipeline(small_cat, seed=0, guidance_scale=2.0, num_inference_steps=1)
    assert calls[0]["args"][0].shape[0] == 2


def test_each_family_has_its_reference_scripts_defaults():
    seesr, turbo, megasr = (get_family(n).defaults for n in ("seesr", "seesr-turbo", "megasr"))
    assert (seesr.steps, seesr.guidance_scale, seesr.tile_overlap) == (50, 5.5, 4)
    assert (turbo.steps, turbo.guidance_scale, turbo.tile_overlap) == (2, 1.0, 32)
    assert (seesr.vae_encode_tile, seesr.vae_decode_tile) == (1024, 1792)  # test_seesr.py: 1024 px, 224 latents
    # SeeSR tiles once the latent has more than 96² pixels; MegaSR once a side exceeds 128
    assert seesr.needs_tiling(97, 96) and not seesr.needs_tiling(96, 96) and seesr.needs_tiling(64, 150)
    assert not megasr.needs_tiling(100, 100) and megasr.needs_tiling(129, 20)
    assert set(FAMILIES) == {"megasr", "seesr", "seesr-turbo"}


def test_turbo_tiles_a_large_latent_with_its_own_tiles(seesr_pipelines, monkeypatch):
    """A 100×100 latent (800 px): SeeSR's rule tiles it in four 96-latent tiles, one model batch."""
    pipeline = seesr_pipelines["seesr-turbo"]
    calls = record_calls(pipeline, monkeypatch)
    lr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    pipeline(lr, seed=0, num_inference_steps=1)
    assert calls[0]["args"][0].shape == (4, 4, 96, 96)


def test_a_seesr_image_is_the_same_alone_or_batched_and_can_be_dropped(seesr_pipelines, small_cat, cat):
    pipeline = seesr_pipelines["seesr"]
    other = cat.crop((100, 50, 140, 78))
    alone = pipeline(small_cat, seed=5, num_inference_steps=2).images[0]
    batched = pipeline([small_cat, other], seed=[5, 6], num_inference_steps=2)
    assert np.abs(pixels(batched.images[0]) - pixels(alone)).max() <= 1
    dropped = pipeline([small_cat, other], seed=[5, 6], num_inference_steps=2, is_cancelled=lambda index: index == 1)
    assert dropped.images[1] is None and dropped.cancelled == [1]
    assert np.abs(pixels(dropped.images[0]) - pixels(alone)).max() <= 1
    with pytest.raises(PipelineCancelled):
        pipeline(small_cat, seed=5, num_inference_steps=2, should_cancel=lambda: True)


@pytest.mark.parametrize("family", ["seesr", "seesr-turbo"])
def test_the_graph_runner_serves_seesr_families(seesr_pipelines, small_cat, family):
    pipeline = seesr_pipelines[family]
    eager = pixels(pipeline(small_cat, seed=2, num_inference_steps=3).images[0])
    pipeline.denoiser_graphs = DenoiserGraphs(pipeline.denoiser, capture=False)
    try:
        static = pixels(pipeline(small_cat, seed=2, num_inference_steps=3).images[0])
        assert pipeline.denoiser_graphs.static_calls == 3  # no MSFM modulation to compute eagerly first
    finally:
        pipeline.denoiser_graphs = None
    assert np.abs(static - eager).max() <= 1


@pytest.mark.parametrize("scope", ["blocks", "full"])
def test_both_compile_scopes_trace_seesrs_image_attentions(seesr_pipelines, small_cat, scope):
    pipeline = seesr_pipelines["seesr-turbo"]
    eager = pixels(pipeline(small_cat, seed=3).images[0])
    torch._dynamo.reset()
    compile_pipeline(pipeline, scope=scope, backend="eager")
    try:
        compiled = pixels(pipeline(small_cat, seed=3).images[0])
    finally:
        uncompile_pipeline(pipeline)
        torch._dynamo.reset()
    assert np.abs(compiled - eager).mean() <= 0.5
