"""Saving and loading: exact round trips, vanilla diffusers UNet folders, overlays, strict errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megasr_core.models import MegaSRConfig, MegaSRDenoiser, WeightsError
from tests.models.helpers import TINY, assert_same_outputs, build_denoiser, make_inputs, perturb_zero_init


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture()
def trained(tiny_base) -> MegaSRDenoiser:
    model = build_denoiser(tiny_base)
    perturb_zero_init(model)
    return model


def test_save_load_round_trip_is_exact(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = MegaSRDenoiser.from_pretrained(tmp_path).eval()
    assert loaded.config == trained.config
    assert_same_state(trained, loaded)
    assert_same_outputs(loaded, trained, make_inputs(seed=3))
    # Trainable flags survive loading.
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(trained.parameter_groups().trainable)


def test_saved_unet_folder_is_a_vanilla_diffusers_folder(trained, tmp_path):
    from diffusers import UNet2DConditionModel

    trained.save_pretrained(tmp_path)
    base_keys = set(load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")))
    assert base_keys and not [k for k in base_keys if ".csm." in k or ".msfm." in k]
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert set(unet.state_dict()) == base_keys


def test_load_vanilla_diffusers_unet_folder(tiny_base, tmp_path):
    unet, _ = tiny_base
    unet.save_pretrained(tmp_path / "unet")  # exactly what an upstream SD2 unet/ folder looks like
    torch.manual_seed(0)
    model = MegaSRDenoiser.from_unet_pretrained(tmp_path / "unet", config=TINY.megasr).eval()
    for key, value in unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[key], value)
    # The ControlNet starts as a copy of the UNet encoder.
    cn = model.controlnet.state_dict()
    for key, value in unet.state_dict().items():
        if key.startswith(("down_blocks", "mid_block", "conv_in", "time_embedding")) and key in cn:
            assert torch.equal(cn[key], value), key
    # The new modules are freshly initialized (zero projections → plain SD2 + ControlNet output),
    # though image tokens and guidance maps are given.
    inputs = make_inputs(seed=0)
    with torch.no_grad():
        out = model(**inputs)
        # Called outside a MegaSR forward, the nets run as plain diffusers (no slot, no tokens).
        down, mid = model.controlnet(
            inputs["latents"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            controlnet_cond=inputs["control_image"],
            return_dict=False,
        )
        plain = model.unet(
            inputs["latents"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
    assert inputs["image_embeds"] is not None and inputs["guidance"]
    assert torch.equal(out, plain)


def test_fp16_variant_and_sharded_folders_load(tiny_base, tmp_path):
    unet, _ = tiny_base
    copy.deepcopy(unet).half().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model = MegaSRDenoiser.from_unet_pretrained(tmp_path / "fp16", config=TINY.megasr)
    key = "conv_in.weight"
    assert torch.equal(model.unet.state_dict()[key], unet.state_dict()[key].half().float())
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = MegaSRDenoiser.from_unet_pretrained(tmp_path / "sharded", config=TINY.megasr)
    assert torch.equal(model.unet.state_dict()[key], unet.state_dict()[key])


def test_overlay_holds_only_megasr_and_trained_keys_and_rebuilds_the_model(tiny_base, trained, tmp_path):
    unet, _ = tiny_base
    unet.save_pretrained(tmp_path / "sd2" / "unet")
    path = trained.save_overlay(tmp_path / "overlay.safetensors")
    keys = set(load_file(str(path)))
    unet_keys = {k for k in keys if k.startswith("unet.")}
    assert unet_keys and all(".csm." in k or ".msfm." in k for k in unet_keys)
    assert {k for k in keys if k.startswith("controlnet.")} == {
        f"controlnet.{k}" for k in trained.controlnet.state_dict()
    }
    rebuilt = MegaSRDenoiser.from_unet_pretrained(tmp_path / "sd2" / "unet", overlay=path).eval()
    assert rebuilt.config == trained.config
    assert_same_state(trained, rebuilt)
    assert_same_outputs(rebuilt, trained, make_inputs(seed=4))
    # Loading into an existing model (copying values) works too.
    fresh = build_denoiser(tiny_base)
    fresh.load_overlay(path)
    assert_same_state(trained, fresh)


def test_overlay_for_another_config_is_refused(trained, tiny_base, tmp_path):
    path = trained.save_overlay(tmp_path / "overlay.safetensors")
    other = build_denoiser(tiny_base, use_hed=False)
    with pytest.raises(WeightsError, match="use_hed"):
        other.load_overlay(path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="not a MegaSR overlay"):
        other.load_overlay(tmp_path / "plain.safetensors")


def _edit_modules_file(folder, edit) -> None:
    path = folder / "unet" / "megasr_modules.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop(sorted(s)[0]), "1 missing: unet.down_blocks.0.attentions.0.msfm"),
        (
            lambda s: s.update({"down_blocks.0.bogus.weight": torch.zeros(2)}),
            "1 unexpected: unet.down_blocks.0.bogus.weight",
        ),
        (
            lambda s: s.update({"mid_block.attentions.0.msfm.hed_saft.beta.bias": torch.zeros(3)}),
            r"wrong shape: unet.mid_block.attentions.0.msfm.hed_saft.beta.bias \(file \(3,\), model \(64,\)\)",
        ),
    ],
)
def test_bad_keys_name_themselves(trained, tmp_path, edit, message):
    trained.save_pretrained(tmp_path)
    _edit_modules_file(tmp_path, edit)
    with pytest.raises(WeightsError, match=message):
        MegaSRDenoiser.from_pretrained(tmp_path)


def test_vanilla_unet_of_the_wrong_shape_is_refused(tiny_base, tmp_path):
    unet, _ = tiny_base
    unet.save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 24
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="wrong shape"):
        MegaSRDenoiser.from_unet_pretrained(tmp_path / "unet", config=TINY.megasr)


def test_missing_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="megasr.json"):
        MegaSRDenoiser.from_pretrained(tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        MegaSRDenoiser.from_unet_pretrained(tmp_path / "unet", config=MegaSRConfig())
