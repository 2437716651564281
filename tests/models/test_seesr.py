"""SeeSR's denoiser: SeeSR's release layout loads unchanged, and each step is SeeSR's equations."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megasr_core.models import SeeSRConfig, SeeSRDenoiser, WeightsError
from megasr_core.models.seesr import IMAGE_ATTENTIONS
from megasr_core.pipelines.denoiser_graphs import DenoiserGraphs
from megasr_core.weights.loading import load_denoiser
from tests.models.seesr_release import RAM_WIDTH, TINY, load_release_for_reference, reference_noise, write_seesr_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_seesr_release(tmp_path_factory.mktemp("seesr") / "release", seed=0)


def _inputs(batch: int = 2, latent: int = 8, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 4, latent, latent, generator=g),
        "timestep": torch.tensor(751),
        "encoder_hidden_states": torch.randn(batch, 77, TINY.unet["cross_attention_dim"], generator=g),
        "image_embeds": torch.randn(batch, 5, RAM_WIDTH, generator=g),
        "control_image": torch.rand(batch, 3, latent * 8, latent * 8, generator=g),
    }


def test_the_release_layout_loads_with_every_key(release):
    model = SeeSRDenoiser.from_pretrained(release)
    for net in ("unet", "controlnet"):
        on_disk = set(load_file(str(release / net / "diffusion_pytorch_model.safetensors")))
        assert set(getattr(model, net).state_dict()) == on_disk
    # SeeSR's names: one image transformer per text transformer (tiny: 1 per down block, 2 per up
    # block, 1 in the middle), none where a block has no text attention
    names = set(model.unet.state_dict())
    assert "down_blocks.0.image_attentions.0.transformer_blocks.0.attn2.to_k.weight" in names
    assert "mid_block.image_attentions.0.proj_out.weight" in names
    assert "up_blocks.3.image_attentions.1.norm.weight" in names
    assert "down_blocks.3.image_attentions.0.norm.weight" not in names  # DownBlock2D
    assert "up_blocks.0.image_attentions.0.norm.weight" not in names  # UpBlock2D
    prefixes = (
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.1",
        "up_blocks.2",
        "up_blocks.3",
    )
    counts = {
        block: len({n[len(block) :].split(".")[2] for n in names if n.startswith(block + ".image_attentions.")})
        for block in prefixes
    }
    assert counts == {block: 1 if block.startswith(("down", "mid")) else 2 for block in prefixes}
    assert "mid_block.image_attentions.0.norm.weight" in set(model.controlnet.state_dict())
    assert model.config.image_embed_dim == RAM_WIDTH and model.config.family == "seesr"


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_a_step_is_seesrs_controlnet_then_unet(release, scale):
    model = SeeSRDenoiser.from_pretrained(release).eval()
    reference = load_release_for_reference(release)
    inputs = _inputs()
    with torch.no_grad():
        ours = model(**inputs, conditioning_scale=scale)
        theirs = reference_noise(
            reference,
            inputs["latents"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            inputs["image_embeds"],
            inputs["control_image"],
            scale,
        )
    assert ours.shape == inputs["latents"].shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # the image attentions and the ControlNet both matter: without them the step differs
    with torch.no_grad():
        other = model(**{**inputs, "image_embeds": inputs["image_embeds"] + 1})
        weaker = model(**inputs, conditioning_scale=scale / 2)
    assert (other - ours).abs().max() > 1e-3 and (weaker - ours).abs().max() > 1e-3


def test_classifier_free_guidance_gives_both_halves_the_same_ram_tokens(release):
    """The pipeline prepares the RAM tokens once for the [negative; positive] batch (SeeSR: cat([ram, ram]))."""
    model = SeeSRDenoiser.from_pretrained(release).eval()
    inputs = _inputs(batch=1)
    doubled = {k: torch.cat([v, v]) if k != "timestep" and k != "image_embeds" else v for k, v in inputs.items()}
    conditioning = model.prepare_conditioning(inputs["image_embeds"], None, 2, repeat=2)
    with torch.no_grad():
        packed = model(
            doubled["latents"],
            inputs["timestep"],
            doubled["encoder_hidden_states"],
            control_image=doubled["control_image"],
            conditioning=conditioning,
        )
        explicit = model(**{**doubled, "image_embeds": torch.cat([inputs["image_embeds"]] * 2)})
    torch.testing.assert_close(packed, explicit, rtol=0, atol=0)


def test_bin_weights_load_too(release, tmp_path):
    binary = write_seesr_release(tmp_path / "bin", seed=0, weights_format="bin")
    assert not list(binary.rglob("*.safetensors"))
    from_bin, from_safetensors = (
        SeeSRDenoiser.from_pretrained(binary).eval(),
        SeeSRDenoiser.from_pretrained(release).eval(),
    )
    theirs = from_safetensors.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in from_bin.state_dict().items())
    inputs = _inputs(batch=1)
    with torch.no_grad():  # equal to float rounding: kernels may sum in another order on differently aligned data
        torch.testing.assert_close(from_bin(**inputs), from_safetensors(**inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "change, named",
    [
        ("drop", "1 missing: mid_block.image_attentions.0.proj_in.weight"),
        ("add", "1 unexpected: mid_block.image_attentions.7.proj_in.weight"),
        ("reshape", "mid_block.image_attentions.0.proj_in.bias (file (3,)"),
    ],
)
def test_missing_unexpected_or_misshapen_keys_are_listed(release, tmp_path, change, named):
    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    path = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = "mid_block.image_attentions.0.proj_in.weight"
    if change == "drop":
        del state[key]
    elif change == "add":
        state[key.replace(".0.", ".7.")] = state[key].clone()
    else:
        state[key.replace("weight", "bias")] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(WeightsError) as error:
        SeeSRDenoiser.from_pretrained(broken)
    assert named in str(error.value)


def test_a_plain_unet_folder_is_refused_by_name(release, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(release, plain)
    config = json.loads((plain / "controlnet" / "config.json").read_text())
    del config["use_image_cross_attention"]
    (plain / "controlnet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="use_image_cross_attention: true.*not a SeeSR ControlNetModel"):
        SeeSRDenoiser.from_pretrained(plain)


def test_save_pretrained_keeps_seesrs_layout_and_family(release, tmp_path):
    model = SeeSRDenoiser.from_pretrained(release, config=SeeSRConfig(family="seesr-turbo")).eval()
    model.save_pretrained(tmp_path / "saved")
    for net in ("unet", "controlnet"):
        assert json.loads((tmp_path / "saved" / net / "config.json").read_text())["use_image_cross_attention"] is True
        assert set(load_file(str(tmp_path / "saved" / net / "diffusion_pytorch_model.safetensors"))) == set(
            load_file(str(release / net / "diffusion_pytorch_model.safetensors"))
        )
    loaded = load_denoiser(tmp_path / "saved")
    assert isinstance(loaded, SeeSRDenoiser) and loaded.family == "seesr-turbo"
    inputs = _inputs(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs), model(**inputs), rtol=0, atol=1e-6)


def test_turbo_takes_the_base_unet_and_only_seesrs_image_attentions(release, tmp_path):
    """SeeSR-Turbo (``from_pretrained_orig``): sd-turbo's UNet weights + SeeSR's image attentions."""
    from tests.models.seesr_release import tiny_networks

    turbo_unet, _ = tiny_networks(seed=7)  # stands for sd-turbo's UNet: other weights, same shapes
    base = tmp_path / "sd-turbo" / "unet"
    turbo_unet.save_pretrained(base)
    model = SeeSRDenoiser.from_parts(
        release / "unet", release / "controlnet", SeeSRConfig(family="seesr-turbo"), base_unet_directory=base
    )
    seesr = load_file(str(release / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, tensor in model.unet.state_dict().items():
        source = seesr[name] if IMAGE_ATTENTIONS in name.split(".") else turbo_unet.state_dict()[name]
        assert torch.equal(tensor, source), name


def test_the_unet_alone_refuses_to_run_without_ram_tokens(release):
    model = SeeSRDenoiser.from_pretrained(release)
    inputs = _inputs(batch=1)
    with pytest.raises(ValueError, match="RAM's image embeddings"):
        model.unet(inputs["latents"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="B×N×16"):
        model(**{**inputs, "image_embeds": torch.zeros(1, 5, 7)})
    with pytest.raises(ValueError, match="no guidance maps"):
        model(**inputs, guidance={"hed": torch.zeros(1, 1, 64, 64)})


def test_cuda_graph_runner_serves_seesr_with_static_ram_tokens(release):
    """The graph runner's static-buffer path (eager on a CPU) gives the eager numbers, step after step."""
    model = SeeSRDenoiser.from_pretrained(release).eval()
    graphs = DenoiserGraphs(model, capture=False)
    inputs = _inputs(batch=1)
    conditioning = model.prepare_conditioning(inputs["image_embeds"], None, 2, repeat=2)
    doubled = {k: torch.cat([inputs[k]] * 2) for k in ("latents", "encoder_hidden_states", "control_image")}
    with torch.no_grad():
        for step, t in enumerate((torch.tensor(999), torch.tensor(499))):
            expected = model(
                doubled["latents"] + step,
                t,
                doubled["encoder_hidden_states"],
                control_image=doubled["control_image"],
                conditioning=conditioning,
            )
            got = graphs(
                doubled["latents"] + step,
                t,
                doubled["encoder_hidden_states"],
                control_image=doubled["control_image"],
                conditioning=conditioning,
            )
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert graphs.static_calls == 2


def test_untrained_controlnet_is_reported(release):
    model = SeeSRDenoiser.from_pretrained(release)
    assert model.untrained_reasons() == []
    with torch.no_grad():
        for name, param in model.controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
                param.zero_()
    assert model.untrained_reasons() and "ControlNet untrained" in model.untrained_reasons()[0]
