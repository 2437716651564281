"""SeeSR and SeeSR-Turbo folders from their public releases: ``megasr weights assemble`` and ``info``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from megasr_core.cli import app
from megasr_core.models import SeeSRDenoiser
from megasr_core.pipelines import MegaSRPipeline
from megasr_core.weights.summary import describe
from megasr_core.weights.tiny import init_tiny
from tests.upstream_layouts import write_releases

runner = CliRunner()


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    return write_releases(tmp_path_factory.mktemp("releases"))


def megasr(*args: str):
    """``megasr ARGS`` in this process (the console script is exercised by the end-to-end test)."""
    return runner.invoke(app, [str(a) for a in args])


def assemble(releases, family: str, output, *extra: str):
    base = releases.sd_turbo if family == "seesr-turbo" else releases.sd2
    return megasr(
        "weights",
        "assemble",
        "--family",
        family,
        "--seesr",
        releases.seesr,
        "--sd2",
        base,
        "--ram",
        releases.ram,
        "--ram-config",
        releases.ram_config,
        "-o",
        output,
        *extra,
    )


@pytest.mark.parametrize("family", ["seesr", "seesr-turbo"])
def test_assembled_folders_load_as_their_family(releases, tmp_path, family):
    result = assemble(releases, family, tmp_path / family, "--dape", str(releases.dape))
    assert result.exit_code == 0, result.output
    title = {"seesr": "SeeSR", "seesr-turbo": "SeeSR-Turbo"}[family]
    assert f"wrote {title} weights to" in result.stdout and "UNTRAINED" not in result.stderr
    assert f"assembling {family}: 100%" in result.stderr and "5/5 [" in result.stderr  # a bar over its stages
    out = tmp_path / family
    assert json.loads((out / "megasr.json").read_text())["family"] == family
    for net in ("unet", "controlnet"):  # SeeSR's own layout: its loaders could read these folders
        assert json.loads((out / net / "config.json").read_text())["use_image_cross_attention"] is True
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler" and scheduler["clip_sample"] is False
    assert scheduler["timestep_spacing"] == ("trailing" if family == "seesr-turbo" else "leading")
    info = json.loads(megasr("weights", "info", out).stdout)
    assert (info["family"], info["trained"], info["untrained_reasons"], info["extractors"]) == (
        family,
        True,
        [],
        ["tagger"],
    )

    # the UNet is SD2-base's (seesr) or sd-turbo's (seesr-turbo) plus SeeSR's image attentions
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    seesr = load_file(str(releases.seesr / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(
        str(
            (releases.sd_turbo if family == "seesr-turbo" else releases.sd2)
            / "unet"
            / "diffusion_pytorch_model.safetensors"
        )
    )
    for key, value in unet.items():
        assert torch.equal(value, seesr[key] if ".image_attentions." in key else base[key]), key
    assert torch.equal(
        load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))["controlnet_mid_block.weight"],
        load_file(str(releases.seesr / "controlnet" / "diffusion_pytorch_model.safetensors"))[
            "controlnet_mid_block.weight"
        ],
    )

    pipeline = MegaSRPipeline.from_pretrained(out, device="cpu")
    assert isinstance(pipeline.denoiser, SeeSRDenoiser) and pipeline.family.name == family
    assert pipeline.identity.trained and pipeline.identity.tagger == "ram"
    assert pipeline.extractors.dtype == torch.float32 and pipeline.extractors.available == ("tagger",)


def test_assembly_says_what_it_needs(releases, tmp_path):
    result = megasr("weights", "assemble", "--family", "seesr", "--sd2", releases.sd2, "-o", tmp_path / "x")
    assert result.exit_code == 2 and "--family seesr needs --seesr" in result.stderr
    result = assemble(releases, "seesr", tmp_path / "y", "--overlay", releases.ram)
    assert result.exit_code == 2 and "--overlay and --extractors are for --family megasr" in result.stderr
    result = megasr(
        "weights",
        "assemble",
        "--family",
        "seesr",
        "--seesr",
        releases.sd2,
        "--sd2",
        releases.sd2,
        "--ram",
        releases.ram,
        "-o",
        tmp_path / "w",
    )
    assert result.exit_code == 2 and "not a SeeSR release folder: missing controlnet/" in result.stderr
    result = megasr("weights", "assemble", "--family", "sdxl", "--sd2", releases.sd2, "-o", tmp_path / "v")
    assert result.exit_code == 2 and "--family must be one of megasr, seesr, seesr-turbo" in result.stderr
    result = assemble(releases, "seesr", tmp_path / "z")
    assert result.exit_code == 0 and "no --dape" in result.stderr


def test_info_reports_untrained_parts_of_an_assembled_megasr(releases, tmp_path):
    """MegaSR from public SD2-base alone: zero-gated modules, a ControlNet copied from the UNet."""
    result = megasr("weights", "assemble", "--sd2", releases.sd2, "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" in result.stderr and "plain SD2-base output" in result.stderr
    info = describe(tmp_path / "m")
    assert info["family"] == "megasr" and info["trained"] is False
    assert any("ControlNet untrained" in r for r in info["untrained_reasons"])
    assert any("plain SD2-base output" in r for r in info["untrained_reasons"])
    assert len(info["random"]) == 2
    # upscaling with it works, and says so loudly
    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).resize((24, 16)).save(tmp_path / "cat.png")
    result = megasr(
        "upscale",
        tmp_path / "cat.png",
        "--weights",
        tmp_path / "m",
        "--steps",
        "1",
        "-o",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "model: MegaSR (weights m, float32, untrained)" in result.stderr
    assert "UNTRAINED" in result.stderr and "plain SD2-base output" in result.stderr
    assert (tmp_path / "out" / "cat.png").is_file()


@pytest.mark.parametrize("family", ["megasr", "seesr", "seesr-turbo"])
def test_tiny_folders_of_every_family_are_marked_untrained(tmp_path, family):
    folder = init_tiny(tmp_path / family, family=family)
    info = describe(folder)
    assert (info["family"], info["trained"], info["tiny_random"]) == (family, False, True)
    assert info["random"] == ["every weight (tiny preset)"]


def test_info_on_a_seesr_preset_counts_image_attentions():
    info = json.loads(megasr("weights", "info", "--preset", "sd2-base", "--family", "seesr").stdout)
    assert info["family"] == "seesr" and info["parameters"]["unet"]["base"] == 865_910_724
    assert info["parameters"]["total"]["image_attentions"] == 385_652_800
    assert info["extractor_parameters"]["tagger"] > 200_000_000  # RAM's Swin-L and tagging head
