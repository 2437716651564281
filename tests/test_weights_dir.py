"""The weights directory: init-tiny writes every component, assemble builds from an SD2 folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from megasr_core.models import MegaSRDenoiser
from megasr_core.weights.layout import COMPONENTS, is_tiny_random, missing_components
from megasr_core.weights.summary import describe
from megasr_core.weights.tiny import init_tiny
from megasr_core.weights.upstream import assemble_from_sd2
from tests.models.helpers import make_inputs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("weights") / "tiny", seed=0)


def test_init_tiny_writes_the_whole_layout(tiny_dir):
    assert missing_components(tiny_dir) == []
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "MegaSRPipeline"
    assert {k: tuple(v) for k, v in index.items() if not k.startswith("_")} == COMPONENTS
    assert is_tiny_random(tiny_dir)
    for folder in ("unet", "controlnet"):
        assert (tiny_dir / folder / "megasr_modules.safetensors").is_file()


def test_every_component_loads_with_its_library(tiny_dir):
    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(tiny_dir / "scheduler")
    denoiser = MegaSRDenoiser.from_pretrained(tiny_dir).eval()

    ids = tokenizer(
        ["a cat, clean, high-resolution, 8k"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = text_encoder(ids).last_hidden_state
        image = torch.rand(1, 3, 64, 64)
        latents = vae.encode(image * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
        assert latents.shape == (1, 4, 8, 8)
        scheduler.set_timesteps(50)
        assert int(scheduler.timesteps[0]) == 981 and int(scheduler.timesteps[-1]) == 1
        inputs = make_inputs(seed=0, batch=1, latent=8)
        noise = denoiser(latents, scheduler.timesteps[0], text, inputs["image_embeds"], inputs["guidance"], image)
    assert noise.shape == latents.shape and torch.isfinite(noise).all()


def test_tiny_weights_exercise_megasr_modules(tiny_dir):
    """The demo weights are random but not zero: guidance and image tokens change the output."""
    denoiser = MegaSRDenoiser.from_pretrained(tiny_dir).eval()
    inputs = make_inputs(seed=0)
    with torch.no_grad():
        a = denoiser(**inputs)
        b = denoiser(**{**inputs, "guidance": None, "image_embeds": None})
    assert not torch.equal(a, b)


def test_init_tiny_refuses_a_non_empty_folder(tiny_dir):
    with pytest.raises(FileExistsError, match="not empty"):
        init_tiny(tiny_dir)


def test_assemble_from_an_sd2_folder(tiny_dir, tmp_path):
    # An upstream-style SD2 folder: vanilla diffusers UNet, PNDM scheduler, no MegaSR files.
    sd2 = tmp_path / "sd2"
    for component in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(tiny_dir / component, sd2 / component)
    vanilla = MegaSRDenoiser.from_pretrained(tiny_dir).unet
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(vanilla.config)
    unet.load_state_dict({k: v for k, v in vanilla.state_dict().items() if ".csm." not in k and ".msfm." not in k})
    unet.save_pretrained(sd2 / "unet")
    PNDMScheduler.from_config(DDPMScheduler.load_config(tiny_dir / "scheduler")).save_pretrained(sd2 / "scheduler")

    out = assemble_from_sd2(
        sd2, tmp_path / "megasr", config=MegaSRDenoiser.from_pretrained(tiny_dir).config.replace(extra={})
    )
    assert missing_components(out) == []
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"
    info = describe(out)
    assert info["tiny_random"] is False
    assert info["parameters"]["unet"]["base"] == sum(p.numel() for p in unet.parameters())

    # With a trained overlay, the assembled model is that trained model.
    trained = MegaSRDenoiser.from_pretrained(tiny_dir)
    overlay = trained.save_overlay(tmp_path / "overlay.safetensors")
    out2 = assemble_from_sd2(sd2, tmp_path / "megasr2", overlay=overlay, extractors=tiny_dir / "extractors")
    assert describe(out2)["extractors"] == ["hed", "depth", "segmentation", "clip", "tagger"]
    rebuilt = MegaSRDenoiser.from_pretrained(out2)
    for key, value in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_assemble_names_missing_parts(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="missing vae, text_encoder, tokenizer, scheduler"):
        assemble_from_sd2(tmp_path, tmp_path / "out")
